//! Prints one TEST-ONLY JWT signed with the keys in fixtures/, for curl and the compose demo:
//!
//! ```sh
//! curl --cacert fixtures/ca.pem -H "Authorization: Bearer $(ds-mint-token)" https://localhost:8443/...
//! ds-mint-token expired --sub alice
//! ```

use clap::Parser;
use ds_e2e::token::{DEFAULT_SUBJECT, TokenKind, mint_for};

#[derive(Parser)]
#[command(
    about = "Mint a TEST-ONLY JWT (fixtures/ keys) that Envoy's e2e config accepts or rejects"
)]
struct Args {
    /// Which token: a valid one, or one that is wrong in exactly one way.
    #[arg(value_enum, default_value = "valid")]
    kind: TokenKind,
    /// The `sub` claim (Envoy forwards it to ds-server as x-ds-subject).
    #[arg(long, default_value = DEFAULT_SUBJECT)]
    sub: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("{}", mint_for(&args.sub, args.kind)?);
    Ok(())
}
