//! Scenario g: what subscriptions cost an append, and how soon a pull-wake follows one.
//!
//! Throughput: the append cell of scenario a on fresh streams with no subscription, then on
//! fresh streams under a root where `subscriptions` pull-wake subscriptions all match every
//! stream (`*`), then without again (A-B-A, so a drift of the machine shows as a gap between
//! the two A cells). After the first append to each stream every subscription has a wake in
//! flight (nobody claims), which is the steady state the O(1) rule is about.
//!
//! Wake latency: one pull-wake subscription; a long-poll reader waits on its wake stream; the
//! time from sending an append to the wake event arriving is one sample; then the wake is
//! claimed and acked so that the next append wakes again.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::append::{self, CellPlan, CellResult};
use crate::client::{Server, header_str};
use crate::process::Process;
use crate::stats::{self, Latency};

#[derive(Clone, Debug)]
pub struct Plan {
    pub subscriptions: usize,
    pub cell: CellPlan,
    pub wake_samples: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubscriptionsResult {
    pub subscriptions: usize,
    pub without_before: CellResult,
    pub with: CellResult,
    pub without_after: CellResult,
    /// Wake latency: append sent → wake event received by a long-poll reader.
    pub wake_latency: Latency,
}

async fn json_request(
    server: &Server,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<(http::StatusCode, serde_json::Value)> {
    let mut conn = server.connect().await?;
    let (parts, bytes) = conn
        .send_collect(
            method,
            path.parse()?,
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await?;
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((parts.status, value))
}

async fn subscribe(server: &Server, root: &str, id: &str, wake: &str) -> anyhow::Result<()> {
    let (status, body) = json_request(
        server,
        Method::PUT,
        &format!("{root}__ds/subscriptions/{id}"),
        serde_json::json!({
            "type": "pull-wake", "pattern": "*", "wake_stream": wake, "lease_ttl_ms": 600_000
        }),
    )
    .await?;
    if !status.is_success() {
        bail!("creating subscription {id} answered {status}: {body}");
    }
    Ok(())
}

pub async fn run(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    plan: &Plan,
) -> anyhow::Result<SubscriptionsResult> {
    let without_before = append::run_cell(
        server,
        server_process,
        &format!("{run_id}-nosubs-a"),
        &plan.cell,
    )
    .await?;

    let with_id = format!("{run_id}-subs");
    let root = format!("/bench-{with_id}/");
    let mut setup = server.connect().await?;
    setup
        .create_stream(&format!("{root}wakes/pool"), "application/json")
        .await?;
    for i in 0..plan.subscriptions {
        subscribe(server, &root, &format!("s{i}"), "wakes/pool").await?;
    }
    let with = append::run_cell(server, server_process, &with_id, &plan.cell).await?;
    let without_after = append::run_cell(
        server,
        server_process,
        &format!("{run_id}-nosubs-b"),
        &plan.cell,
    )
    .await?;

    let wake_latency = wake_latency(server, run_id, plan.wake_samples).await?;
    Ok(SubscriptionsResult {
        subscriptions: plan.subscriptions,
        without_before,
        with,
        without_after,
        wake_latency,
    })
}

async fn wake_latency(server: &Server, run_id: &str, samples: usize) -> anyhow::Result<Latency> {
    let root = format!("/bench-{run_id}-wake/");
    let wake_path = format!("{root}wakes/latency");
    let stream = format!("{root}s");
    let mut setup = server.connect().await?;
    setup.create_stream(&wake_path, "application/json").await?;
    setup
        .create_stream(&stream, "application/octet-stream")
        .await?;
    subscribe(server, &root, "latency", "wakes/latency").await?;
    let sub = format!("{root}__ds/subscriptions/latency");
    let mut offset = setup.tail_offset(&wake_path).await?;
    let mut writer = server.connect().await?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut reader = server.connect().await?;
        let uri: http::Uri = format!("{wake_path}?offset={offset}&live=long-poll").parse()?;
        let read = tokio::spawn(async move {
            let r = reader
                .send_collect(Method::GET, uri, None, Bytes::new())
                .await;
            (Instant::now(), r)
        });
        // The long-poll must be waiting before the append, or the sample measures nothing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        let status = writer
            .append(
                stream.parse()?,
                "application/octet-stream",
                Bytes::from_static(b"x"),
            )
            .await?;
        if !status.is_success() {
            bail!("append answered {status}");
        }
        let (t1, answer) = read.await?;
        let (parts, body) = answer?;
        if parts.status != http::StatusCode::OK {
            bail!(
                "wake long-poll answered {} (no wake within the long-poll timeout)",
                parts.status
            );
        }
        out.push((t1 - t0).as_nanos() as u64);
        offset = header_str(&parts.headers, "stream-next-offset")
            .context("wake read without Stream-Next-Offset")?
            .to_owned();
        let events: serde_json::Value = serde_json::from_slice(&body)?;
        if events.as_array().is_none_or(|e| e.is_empty()) {
            bail!("wake read returned no event: {events}");
        }
        // Claim and finish the wake so that the next append wakes again.
        let (status, claim) = json_request(
            server,
            Method::POST,
            &format!("{sub}/claim"),
            serde_json::json!({"worker": "bench"}),
        )
        .await?;
        if !status.is_success() {
            bail!("claim answered {status}: {claim}");
        }
        let acks: Vec<serde_json::Value> = claim["streams"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|l| serde_json::json!({"stream": l["path"], "offset": l["tail_offset"]}))
                    .collect()
            })
            .unwrap_or_default();
        let mut conn = server.connect().await?;
        let token = claim["token"].as_str().unwrap_or_default().to_owned();
        let (parts, body) = conn
            .send_collect_with_bearer(
                Method::POST,
                format!("{sub}/ack").parse()?,
                &token,
                Bytes::from(
                    serde_json::json!({
                        "wake_id": claim["wake_id"], "generation": claim["generation"],
                        "acks": acks, "done": true
                    })
                    .to_string(),
                ),
            )
            .await?;
        if !parts.status.is_success() {
            bail!(
                "ack answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            );
        }
    }
    Ok(stats::summarize_ns(&mut out))
}
