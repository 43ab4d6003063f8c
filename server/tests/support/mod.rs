//! What the tests that start `ds-server` processes share.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// A port for one server: free when asked (bound to port 0 and let go), and never handed out
/// twice in this test process. The kernel may give a released port out again at once, and
/// tests run concurrently: two servers told the same port, one fails to bind and its test
/// talks to the other's server (a crash test once compared another test's stream).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if GIVEN.lock().expect("ports").insert(port) {
            return port;
        }
    }
}
