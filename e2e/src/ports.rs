//! Free loopback ports for the processes a test starts.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The only address e2e processes listen on.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Ports are handed out from `FIRST .. FIRST + SPAN`, below the kernel's ephemeral range
/// (32768-60999 on Linux by default). A port from `bind(0)` lies inside that range, and between
/// our check and the process binding it any client socket could take it as its source port: CI
/// on 2026-12-03 saw Envoy fail with "cannot bind '127.0.0.1:36307': Address already in use".
const FIRST: u32 = 20_000;
const SPAN: u32 = 10_000;

/// Where this process starts in the span (random, so that test binaries run at the same time
/// rarely meet), and how many ports it has handed out (so that its own tests never do).
static START: OnceLock<u32> = OnceLock::new();
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A TCP port on 127.0.0.1 that was free a moment ago and that no client socket can take.
///
/// The port is released before returning, so another process could still bind it before ours
/// does; outside the ephemeral range only a deliberate listener can, and a fixed port per
/// component is what lets a killed process restart where Envoy and clients expect it.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let start = *START.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (nanos ^ std::process::id().wrapping_mul(7_919)) % SPAN
    });
    for _ in 0..SPAN {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % SPAN;
        let port = u16::try_from(port).expect("the span lies below 65536");
        if TcpListener::bind((LOOPBACK, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {FIRST}..{}", FIRST + SPAN),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_distinct() {
        let ports: Vec<u16> = (0..50)
            .map(|_| free_loopback_port().expect("port"))
            .collect();
        assert!(
            ports
                .iter()
                .all(|&p| (FIRST..FIRST + SPAN).contains(&u32::from(p))),
            "{ports:?}"
        );
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
    }
}
