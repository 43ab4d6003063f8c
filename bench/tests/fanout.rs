//! The fan-out scenario's hand-written SSE readers against the real server (in-process, port 0,
//! memory mode), and the loopback floor: every reader must get every record once, in order,
//! including across the server's periodic SSE close.

use std::time::Duration;

use ds_bench::client::Server;
use ds_bench::fanout::{self, FanoutResult, Plan};
use ds_bench::floor;
use ds_server::App;
use ds_server::config::Config;

fn plan(readers: usize) -> Plan {
    Plan {
        readers,
        messages_per_sec: 50,
        send_for: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(10),
        connect_concurrency: 8,
    }
}

fn assert_complete(result: &FanoutResult, readers: usize) {
    assert_eq!(result.first_error, None, "{result:?}");
    assert_eq!(result.connected, readers, "{result:?}");
    assert_eq!(result.complete_readers, readers, "{result:?}");
    assert_eq!(result.expected, 100 * readers as u64, "{result:?}");
    assert_eq!(result.delivered, result.expected, "{result:?}");
    assert_eq!(result.out_of_order, 0, "{result:?}");
    assert_eq!(result.latency.count, result.expected, "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_readers_receive_every_record_across_periodic_closes() {
    let mut config = Config::default();
    config.server.port = 0;
    // Well inside the 2 s of sending, so every reader must resume at least once.
    config.server.sse_reconnect_interval = Duration::from_millis(700);
    let app = App::build(config).await.expect("server builds");
    let addr = app.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));

    let server = Server::from_url(&format!("http://{addr}")).expect("loopback url");
    let readers = 20;
    let result = fanout::run(&server, "test", &plan(readers))
        .await
        .expect("fan-out runs");
    assert_complete(&result, readers);
    assert!(
        result.reconnects >= readers as u64,
        "every reader resumes after the periodic close: {result:?}"
    );
    assert_eq!(result.append_latency.count, 100);

    let _ = stop.send(());
    handle.await.expect("joins").expect("server stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_floor_delivers_every_frame() {
    let readers = 20;
    let result = floor::run(&plan(readers)).await.expect("floor runs");
    assert_complete(&result, readers);
    assert_eq!(result.reconnects, 0);
}
