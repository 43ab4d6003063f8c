//! Pure rules of the subscription module; the HTTP-level rules are in `server/tests/subscriptions.rs`.

use super::*;

fn settings() -> Settings {
    Settings {
        max_subscriptions: 10,
        max_links: 10,
        allow_local_webhooks: false,
        public_url: None,
        retry_min: Duration::from_secs(1),
        retry_max: Duration::from_secs(60),
        webhook_timeout: Duration::from_secs(10),
    }
}

fn spec(streams: &[&str]) -> Spec {
    Spec {
        delivery: Delivery::PullWake {
            wake_stream: "wake/pool".into(),
        },
        pattern: Some("events/*".into()),
        streams: streams.iter().map(|s| (*s).to_owned()).collect(),
        lease_ttl_ms: DEFAULT_LEASE_MS,
        description: None,
    }
}

#[test]
fn the_configuration_hash_ignores_the_order_and_repeats_of_streams() {
    let mut a = spec(&["b", "a", "b"]);
    let mut b = spec(&["a", "b"]);
    a.validate(&settings()).expect("valid");
    b.validate(&settings()).expect("valid");
    assert_eq!(a.hash(), b.hash());
    let mut c = spec(&["a", "b"]);
    c.description = Some("other".into());
    c.validate(&settings()).expect("valid");
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn a_subscription_needs_a_pattern_or_streams() {
    let mut s = spec(&[]);
    s.pattern = None;
    assert!(matches!(
        s.validate(&settings()),
        Err(SubscriptionError::Invalid(_))
    ));
}

#[test]
fn backoff_doubles_from_the_minimum_to_the_maximum_within_20_percent() {
    let queue = NoticeQueue::new();
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::memory::MemoryStorage);
    let limits = crate::stream::Limits {
        max_stream_bytes: 1 << 20,
        max_total_bytes: 1 << 20,
        max_read_bytes: 1 << 20,
    };
    let streams = Arc::new(
        Streams::open_observed(storage.clone(), limits, None, Some(queue.events())).expect("open"),
    );
    let key = Arc::new(SigningKey::generate().expect("key"));
    let subs = Subscriptions::open(streams, storage, queue, settings(), key, None).expect("open");
    for (attempt, base_ms) in [
        (1u32, 1_000u64),
        (2, 2_000),
        (3, 4_000),
        (7, 60_000),
        (40, 60_000),
    ] {
        for _ in 0..50 {
            let d = subs.backoff(attempt).as_millis() as u64;
            assert!(
                d >= base_ms * 8 / 10 && d <= base_ms * 12 / 10,
                "attempt {attempt}: {d} ms is not within 20% of {base_ms} ms"
            );
        }
    }
}
