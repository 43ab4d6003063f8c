//! Free loopback ports for the processes a test starts.

use std::net::{Ipv4Addr, TcpListener};

/// The only address e2e processes listen on.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process could take it before ours binds;
/// on a loopback-only test machine that window is tiny, and a fixed port per component is what lets
/// a killed process restart where Envoy and clients expect it.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((LOOPBACK, 0))?;
    Ok(listener.local_addr()?.port())
}
