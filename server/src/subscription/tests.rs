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
        links_from_start: false,
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
        ..Default::default()
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

/// A subscriber may learn of a new stream before its create notice has linked it (ds-sync reads
/// the registry; the delivery task stores each change before the next, so it can trail a busy
/// server): its ack naming that instance links the stream then, is applied, and releases;
/// the notice arriving later keeps the ack.
#[tokio::test]
async fn an_ack_of_a_stream_whose_create_notice_is_still_queued_links_and_applies() {
    let queue = NoticeQueue::new();
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::memory::MemoryStorage);
    let mut streams = Streams::open_observed(
        storage.clone(),
        crate::stream::Limits::default(),
        None,
        Some(queue.events()),
    )
    .expect("open");
    streams.set_retention(crate::stream::Retention {
        acked: true,
        min_age_ms: 0,
    });
    let streams = Arc::new(streams);
    let key = Arc::new(SigningKey::generate().expect("key"));
    let subs =
        Subscriptions::open(streams.clone(), storage, queue, settings(), key, None).expect("open");
    let mut inbox = subs.inbox.lock().take().expect("inbox");
    let json = || crate::stream::CreateRequest {
        content_type: Some("application/json".into()),
        ..crate::stream::CreateRequest::default()
    };
    streams
        .create("/wake/pool", json())
        .await
        .expect("wake stream");
    let sub = SubKey {
        root: "/".into(),
        id: "early".into(),
    };
    subs.put(sub.clone(), spec(&[]), "http://x")
        .await
        .expect("subscribe");
    while let Ok(n) = inbox.try_recv() {
        let _ = subs.on_notice(n).await;
    }
    let (claim, _) = subs.claim(&sub, "w").await.expect("claim");

    // Created and written; its create notice waits in the queue.
    let created = streams.create("/events/x", json()).await.expect("create");
    let tail = streams
        .append(
            "/events/x",
            crate::stream::AppendRequest {
                content_type: Some("application/json".into()),
                body: bytes::Bytes::from_static(br#"{"n":1}"#),
                ..crate::stream::AppendRequest::default()
            },
        )
        .await
        .expect("append")
        .next_offset;
    let ack = |stream_id: Option<StreamId>| AckRequest {
        wake_id: claim.wake_id.clone(),
        generation: claim.generation,
        acks: vec![("events/x".into(), tail)],
        stream_ids: vec![stream_id],
        done: false,
    };
    // Without an instance named, an unlinked stream is refused as before.
    assert!(matches!(
        subs.ack(&sub, Some(&claim.token), ack(None), false).await,
        Err(SubscriptionError::NotLinked(_))
    ));
    // Another instance's ack is skipped (it is not the stream there).
    subs.ack(&sub, Some(&claim.token), ack(Some(created.id + 1)), false)
        .await
        .expect("skipped");
    assert!(subs.get(&sub).expect("view").links.is_empty());
    subs.ack(&sub, Some(&claim.token), ack(Some(created.id)), false)
        .await
        .expect("ack");
    let acked = |view: View| {
        view.links
            .iter()
            .find(|l| l.path == "events/x")
            .map(|l| l.acked)
    };
    assert_eq!(acked(subs.get(&sub).expect("view")), Some(tail));
    streams.release_due().await;
    let stream = streams.peek("/events/x").expect("stream");
    assert_eq!(stream.earliest(), tail, "released up to the ack");
    // The notice comes through: the link keeps its ack.
    while let Ok(n) = inbox.try_recv() {
        let _ = subs.on_notice(n).await;
    }
    assert_eq!(acked(subs.get(&sub).expect("view")), Some(tail));
}

// ---- the property test against a model ----
//
// Random appends, claims, acks (heartbeats and done), releases, clock advances (lease expiry)
// and restarts (file-fast, reopened from disk) against a small model of section 7. After every
// step: acked offsets equal the model's (so they never move backwards), at most one worker holds
// the lease and it is the one the model says, claims get fresh generations, and an idle
// subscription never sits on pending work (it always wakes again).

mod model {
    use std::sync::atomic::AtomicU64;

    use proptest::prelude::*;

    use super::super::*;
    use super::{settings, spec};
    use crate::storage::file::{FileOptions, FileStorage};
    use crate::stream::{AppendRequest, CreateRequest, Limits};

    const STREAMS: usize = 3;
    const WORKERS: usize = 2;
    const LEASE: u64 = 1_000;

    #[derive(Clone, Debug)]
    enum Step {
        Append(usize, usize),
        Claim(usize),
        Ack {
            worker: usize,
            stream: usize,
            percent: u64,
            done: bool,
        },
        Release(usize),
        Advance(u64),
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..STREAMS, 1usize..20).prop_map(|(s, n)| Step::Append(s, n)),
            3 => (0..WORKERS).prop_map(Step::Claim),
            4 => (0..WORKERS, 0..STREAMS, 0u64..=100, any::<bool>())
                .prop_map(|(worker, stream, percent, done)| Step::Ack { worker, stream, percent, done }),
            1 => (0..WORKERS).prop_map(Step::Release),
            2 => (0u64..1_600).prop_map(Step::Advance),
            1 => Just(Step::Restart),
        ]
    }

    struct Server {
        streams: Arc<Streams>,
        subs: Arc<Subscriptions>,
        inbox: mpsc::UnboundedReceiver<Notice>,
    }

    fn open(dir: &std::path::Path, clock: &Arc<AtomicU64>) -> Server {
        let storage: Arc<dyn Storage> = Arc::new(
            FileStorage::open(
                dir,
                FileOptions {
                    durable: false,
                    segment_bytes: 1 << 20,
                    max_open_files: 8,
                    map_reads: true,
                    cache_bytes: 1 << 20,
                    fast_sync_interval: Duration::from_secs(1),
                },
            )
            .expect("storage"),
        );
        let queue = NoticeQueue::new();
        let limits = Limits {
            max_stream_bytes: 1 << 20,
            max_total_bytes: u64::MAX,
            max_read_bytes: 1 << 20,
            ..Default::default()
        };
        let streams = Arc::new(
            Streams::open_observed(storage.clone(), limits, None, Some(queue.events()))
                .expect("streams"),
        );
        let key = Arc::new(SigningKey::generate().expect("key"));
        let c = clock.clone();
        let subs = Subscriptions::open(
            streams.clone(),
            storage,
            queue,
            settings(),
            key,
            Some("file-fast"),
        )
        .expect("subscriptions")
        .with_clock(Arc::new(move || c.load(Ordering::SeqCst)));
        let inbox = subs.inbox.lock().take().expect("inbox");
        Server {
            streams,
            subs: Arc::new(subs),
            inbox,
        }
    }

    /// What the delivery task would do: every queued notice, then every due deadline.
    async fn settle(s: &mut Server) {
        while let Ok(n) = s.inbox.try_recv() {
            let _ = s.subs.on_notice(n).await;
        }
        let _ = s.subs.run_timers().await;
    }

    fn key() -> SubKey {
        SubKey {
            root: "/".into(),
            id: "prop".into(),
        }
    }

    /// The model: tails, acks, who holds the lease until when, and each worker's last claim.
    #[derive(Default)]
    struct Model {
        tails: [u64; STREAMS],
        acked: [u64; STREAMS],
        holder: Option<(usize, u64)>,
        claims: [Option<(String, String, u64)>; WORKERS],
        max_generation: u64,
    }

    async fn run(steps: Vec<Step>) {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let mut s = open(dir.path(), &clock);
        for i in 0..STREAMS {
            s.streams
                .create(
                    &format!("/p/{i}"),
                    CreateRequest {
                        content_type: Some("application/octet-stream".into()),
                        ..CreateRequest::default()
                    },
                )
                .await
                .expect("create");
        }
        s.streams
            .create(
                "/wake",
                CreateRequest {
                    content_type: Some("application/json".into()),
                    ..CreateRequest::default()
                },
            )
            .await
            .expect("create");
        let mut spec = spec(&[]);
        spec.pattern = Some("p/*".into());
        spec.delivery = Delivery::PullWake {
            wake_stream: "wake".into(),
        };
        spec.lease_ttl_ms = LEASE;
        s.subs
            .put(key(), spec, "http://x")
            .await
            .expect("subscribe");
        let mut m = Model::default();
        for step in steps {
            let now = clock.load(Ordering::SeqCst);
            let live_holder = m.holder.filter(|(_, until)| *until > now).map(|(w, _)| w);
            match step {
                Step::Append(i, n) => {
                    let out = s
                        .streams
                        .append(
                            &format!("/p/{i}"),
                            AppendRequest {
                                content_type: Some("application/octet-stream".into()),
                                body: bytes::Bytes::from(vec![b'x'; n]),
                                ..AppendRequest::default()
                            },
                        )
                        .await
                        .expect("append");
                    m.tails[i] = out.next_offset;
                }
                Step::Claim(w) => match s.subs.claim(&key(), &format!("w{w}")).await {
                    Ok((claim, _)) => {
                        assert!(
                            live_holder.is_none(),
                            "claimed while w{live_holder:?} holds the lease"
                        );
                        assert!(claim.generation > m.max_generation, "generation repeats");
                        m.max_generation = claim.generation;
                        m.holder = Some((w, now + LEASE));
                        m.claims[w] = Some((claim.token, claim.wake_id, claim.generation));
                    }
                    Err(SubscriptionError::AlreadyClaimed { holder, .. }) => {
                        assert_eq!(live_holder.map(|h| format!("w{h}")), Some(holder));
                    }
                    Err(e) => panic!("claim: {e}"),
                },
                Step::Ack {
                    worker,
                    stream,
                    percent,
                    done,
                } => {
                    let Some((token, wake_id, generation)) = m.claims[worker].clone() else {
                        continue;
                    };
                    let offset = m.tails[stream] * percent / 100;
                    let req = AckRequest {
                        wake_id,
                        generation,
                        acks: vec![(format!("p/{stream}"), offset)],
                        stream_ids: Vec::new(),
                        done,
                    };
                    let current = live_holder == Some(worker) && generation == m.max_generation;
                    match s.subs.ack(&key(), Some(&token), req, false).await {
                        Ok(_) => {
                            assert!(current, "a stale ack was accepted");
                            m.acked[stream] = m.acked[stream].max(offset);
                            m.holder = if done {
                                None
                            } else {
                                Some((worker, now + LEASE))
                            };
                        }
                        Err(SubscriptionError::Fenced) => {
                            assert!(!current, "a current ack was fenced")
                        }
                        Err(e) => panic!("ack: {e}"),
                    }
                }
                Step::Release(w) => {
                    let Some((token, wake_id, generation)) = m.claims[w].clone() else {
                        continue;
                    };
                    let current = live_holder == Some(w) && generation == m.max_generation;
                    match s
                        .subs
                        .release(&key(), Some(&token), &wake_id, generation)
                        .await
                    {
                        Ok(_) => {
                            assert!(current, "a stale release was accepted");
                            m.holder = None;
                        }
                        Err(SubscriptionError::Fenced) => {
                            assert!(!current, "a current release was fenced")
                        }
                        Err(e) => panic!("release: {e}"),
                    }
                }
                Step::Advance(ms) => {
                    clock.fetch_add(ms, Ordering::SeqCst);
                }
                Step::Restart => {
                    drop(s);
                    s = open(dir.path(), &clock);
                    // As the delivery task does when it starts.
                    let _ = s.subs.poke_all().await;
                }
            }
            settle(&mut s).await;
            let now = clock.load(Ordering::SeqCst);
            if m.holder.is_some_and(|(_, until)| until <= now) {
                m.holder = None;
            }
            // The server agrees with the model.
            let view = s.subs.get(&key()).expect("get");
            for i in 0..STREAMS {
                let link = view
                    .links
                    .iter()
                    .find(|l| l.path == format!("p/{i}"))
                    .expect("linked");
                assert_eq!(link.acked, m.acked[i], "acked offset of p/{i}");
            }
            let st = s.subs.state.lock();
            let sub = st.subs.get(&key()).expect("state");
            let holder = sub.wake.as_ref().and_then(|w| w.holder.clone());
            assert_eq!(
                holder,
                m.holder.map(|(w, _)| format!("w{w}")),
                "lease holder"
            );
            if sub.wake.is_none() {
                assert!(
                    s.subs.pending(sub).is_empty(),
                    "idle with pending work: nothing will wake it"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn subscriptions_follow_the_model(steps in proptest::collection::vec(step(), 1..60)) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(run(steps));
        }
    }
}
