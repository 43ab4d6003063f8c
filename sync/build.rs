//! `sqlx::migrate!("../migrations")` (src/db.rs) embeds the migration files at compile time, but
//! cargo does not know the macro read them: without this, a migration added to the directory
//! leaves a cached build (a developer's target dir, the Dockerfile's cache mount) with the old
//! set, and the binary ships without it. Cargo scans the whole directory for changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
