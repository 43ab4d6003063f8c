//! End-to-end harness: the deployable stack on loopback, one copy per test.
//!
//! Owns starting and crashing the real pieces (Postgres, Envoy, the `ds-server` and `ds-sync`
//! binaries), minting test JWTs, and TLS clients that trust only the test CA. It knows nothing of
//! the protocol's rules: tests assert those through HTTP.
//!
//! Rules every helper keeps: loopback only (127.0.0.1), free ports, temp dirs, no sleeps to wait
//! for readiness (poll a condition with a deadline: [`wait::wait_until`]), children killed on drop.

#[cfg(test)]
mod compose_file;
pub mod envoy;
pub mod fixtures;
pub mod metrics;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod server;
pub mod stack;
pub mod sync;
pub mod tls;
pub mod token;
pub mod wait;
