//! `ds-bench` binary: parse arguments and hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = ds_bench::cli::Cli::parse();
    ds_bench::cli::run(cli)
}
