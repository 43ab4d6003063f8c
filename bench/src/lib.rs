//! ds-bench: the load generator behind `bench/run.sh`.
//!
//! Each `ds-bench run` drives one scenario against one already-running server and appends one
//! JSON line per result to a results file; `ds-bench report` turns that file into the Markdown
//! tables of the README. Starting, stopping and restarting servers is `run.sh`'s job, so that every
//! scenario meets a fresh process and this crate never needs to know how a competitor is launched.
//!
//! The client side is deliberately thin: one raw hyper HTTP/1.1 keep-alive connection per writer
//! or reader (no pool, no retries, no middleware), so that a measured latency is the server's
//! answer time plus loopback and little else.

pub mod append;
pub mod catchup;
pub mod cli;
pub mod client;
pub mod fanout;
pub mod floor;
pub mod idle;
pub mod process;
pub mod records;
pub mod report;
pub mod restart;
pub mod sse;
pub mod stats;
pub mod subscriptions;
pub mod sync;
