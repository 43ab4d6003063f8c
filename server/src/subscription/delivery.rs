//! The delivery task: the one place subscriptions have side effects. It turns stream notices and
//! due deadlines into state changes (through [`Subscriptions`]) and runs the resulting effects:
//! wake events appended to wake streams, signed webhook POSTs on tasks of their own. Nothing
//! here runs on the append path.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Effect, Subscriptions, webhook_target};
use crate::stream::AppendRequest;

/// Largest webhook response body read (only `{"done": true}` matters).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Sends webhooks.
pub struct Webhooks {
    client: reqwest::Client,
}

impl Webhooks {
    pub fn new(allow_local: bool, timeout: Duration) -> anyhow::Result<Webhooks> {
        let client = reqwest::Client::builder()
            .dns_resolver(webhook_target::GuardedResolver { allow_local })
            // A redirect could lead anywhere, past the checks.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("ds-server/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Webhooks { client })
    }

    /// POSTs `body` signed; `Ok(true)` when the receiver answered `{"done": true}`.
    async fn post(&self, subs: &Subscriptions, url: &str, body: Vec<u8>) -> Result<bool, String> {
        // Checked again at send time: the rules may be stricter now than at creation.
        webhook_target::check(url, subs.settings().allow_local_webhooks)?;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let signature = subs.signing_key().signature_header(t, &body);
        let mut response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("receiver answered {status}"));
        }
        let mut reply = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("{e}"))? {
            if reply.len() + chunk.len() > MAX_REPLY_BYTES {
                // Not a done reply: it would be tiny. Accepted, waiting for a callback.
                return Ok(false);
            }
            reply.extend_from_slice(&chunk);
        }
        let done = serde_json::from_slice::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("done").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        Ok(done)
    }
}

/// Runs effects in the background.
pub fn spawn_effects(subs: &Arc<Subscriptions>, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::WakeEvent { stream, body } => {
                let subs = subs.clone();
                tokio::spawn(async move {
                    let req = AppendRequest {
                        content_type: Some("application/json".into()),
                        body,
                        ..AppendRequest::default()
                    };
                    if let Err(e) = subs.streams.append(&stream, req).await {
                        // The wake stays claimable; a worker that polls `claim` still gets it.
                        tracing::warn!(wake_stream = %stream, error = %e, "cannot write a wake event");
                    }
                });
            }
            Effect::Post {
                key,
                wake_id,
                url,
                body,
            } => {
                let subs = subs.clone();
                tokio::spawn(async move {
                    let outcome = subs.webhooks.post(&subs, &url, body).await;
                    match subs.webhook_outcome(&key, &wake_id, outcome).await {
                        Ok(next) => spawn_effects(&subs, next),
                        Err(e) => tracing::error!(error = %e, "cannot record a webhook outcome"),
                    }
                });
            }
        }
    }
}

/// The task: notices, deadlines, until shutdown.
pub async fn run(subs: Arc<Subscriptions>, shutdown: CancellationToken) {
    let Some(mut inbox) = subs.inbox.lock().take() else {
        tracing::error!("subscription delivery task started twice");
        return;
    };
    let effects = subs.poke_all().await;
    spawn_effects(&subs, effects);
    let mut next_due: Option<u64> = Some(0);
    loop {
        let sleep = match next_due {
            Some(at) => Duration::from_millis(at.saturating_sub(crate::stream::now_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            notice = inbox.recv() => {
                let Some(notice) = notice else { break };
                let effects = subs.on_notice(notice).await;
                spawn_effects(&subs, effects);
            }
            () = subs.reschedule.notified() => {
                next_due = Some(0);
            }
            () = tokio::time::sleep(sleep) => {
                let (effects, next) = subs.run_timers().await;
                next_due = next;
                spawn_effects(&subs, effects);
            }
            () = shutdown.cancelled() => break,
        }
    }
}
