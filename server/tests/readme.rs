//! The README's configuration table is the code's, word for word (one source of truth).

#[test]
fn readme_lists_every_setting_exactly_as_the_code_does() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the workspace root");
    let table = ds_server::config::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's configuration table differs from `ds-server --print-config-table`:\n{table}"
    );
}
