//! The results file (one JSON record per line, appended by each `ds-bench run`) and the Markdown
//! tables made from it: one table per scenario, one row per server, servers in run order.

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::append::CellResult;
use crate::catchup::CatchupResult;
use crate::fanout::FanoutResult;
use crate::idle::{IdleResult, ReaderKind};
use crate::sync::SyncResult;

/// One line of the results file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    /// The server and mode, e.g. `ds-server memory`.
    pub label: String,
    /// What the mode promises (durability), shown once in the servers table.
    #[serde(default)]
    pub about: Option<String>,
    /// Which of run.sh's append rounds the cells belong to: records of one label and round are
    /// one round's cells (run.sh measures cell by cell, every server in turn). Absent: the
    /// record is a round of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    pub outcome: Outcome,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Outcome {
    Append {
        cells: Vec<CellResult>,
    },
    Fanout {
        runs: Vec<FanoutResult>,
    },
    Idle {
        result: IdleResult,
    },
    Catchup {
        result: CatchupResult,
    },
    Records {
        result: crate::records::RecordsResult,
    },
    Restart {
        result: crate::restart::RestartResult,
    },
    Sync {
        result: SyncResult,
    },
    Subscriptions {
        result: Box<crate::subscriptions::SubscriptionsResult>,
    },
    Failed {
        scenario: String,
        error: String,
    },
    Skipped {
        reason: String,
    },
}

pub fn append_record(path: &Path, record: &Record) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(record)?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all(line.as_bytes())?;
    Ok(())
}

pub fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1_000.0)
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// What reading a restarted server's stream back gave.
fn read_back(check: &crate::restart::Check) -> String {
    match &check.read_error {
        Some(why) => format!("refused: {why}"),
        None => format!(
            "{:.2} GB in {:.1} s",
            check.read_bytes as f64 / 1e9,
            check.read_secs
        ),
    }
}

/// Seconds, with milliseconds below ten seconds.
fn fmt_secs(secs: f64) -> String {
    if secs >= 10.0 {
        format!("{secs:.1} s")
    } else {
        format!("{secs:.3} s")
    }
}

fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 1_000.0 {
        format!("{:.1}k/s", per_sec / 1_000.0)
    } else {
        format!("{per_sec:.0}/s")
    }
}

/// A count with a thousands suffix: 950, 12.3k, 1.20M.
fn fmt_count(n: f64) -> String {
    if n >= 1_000_000.0 {
        format!("{:.2}M", n / 1_000_000.0)
    } else if n >= 1_000.0 {
        format!("{:.1}k", n / 1_000.0)
    } else {
        format!("{n:.0}")
    }
}

fn labels_in_order(records: &[Record]) -> Vec<&str> {
    let mut labels: Vec<&str> = Vec::new();
    for r in records {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    labels
}

/// Failures of `scenario` (and whole-server skips), as a list under its table.
fn problems(records: &[Record], scenario: &str, out: &mut String) {
    let lines: Vec<String> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed { scenario: s, error } if s == scenario => Some(format!(
                "- {}: {scenario} failed: {}",
                r.label,
                error.replace('\n', " ")
            )),
            _ => None,
        })
        .collect();
    list_after_table(&lines, out);
}

/// A Markdown list, separated from the table above it by a blank line.
fn list_after_table(lines: &[String], out: &mut String) {
    if !lines.is_empty() {
        out.push('\n');
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
    }
}

fn cell<'a>(cells: &[&'a CellResult], writers: usize, streams: usize) -> Option<&'a CellResult> {
    cells
        .iter()
        .copied()
        .find(|c| c.writers == writers && c.streams == streams)
}

/// The label every throughput is compared with in the share table.
const BASELINE: &str = "ds-server memory";

/// One append round of one server: its round number (if recorded) and its cells.
struct Round<'a> {
    number: Option<u32>,
    cells: Vec<&'a CellResult>,
}

/// Each server's append results, one entry per round, servers in run order. Records of one
/// label with the same round number merge into one round; a record without one is a round.
fn append_rounds(records: &[Record]) -> Vec<(&str, Vec<Round<'_>>)> {
    let mut out: Vec<(&str, Vec<Round<'_>>)> = Vec::new();
    for r in records {
        if let Outcome::Append { cells } = &r.outcome {
            let rounds = match out.iter_mut().position(|(l, _)| *l == r.label) {
                Some(i) => &mut out[i].1,
                None => {
                    out.push((&r.label, Vec::new()));
                    &mut out.last_mut().expect("just pushed").1
                }
            };
            match rounds
                .iter_mut()
                .find(|round| round.number.is_some() && round.number == r.round)
            {
                Some(round) => round.cells.extend(cells),
                None => rounds.push(Round {
                    number: r.round,
                    cells: cells.iter().collect(),
                }),
            }
        }
    }
    out
}

/// The round whose cell had the median throughput (the lower middle of an even count), so
/// that one cell's throughput, latency and CPU all come from the same measurement.
fn median_cell<'a>(runs: &[Round<'a>], writers: usize, streams: usize) -> Option<&'a CellResult> {
    let mut found: Vec<&CellResult> = runs
        .iter()
        .filter_map(|r| cell(&r.cells, writers, streams))
        .collect();
    found.sort_by(|a, b| a.appends_per_sec.total_cmp(&b.appends_per_sec));
    found.get(found.len().saturating_sub(1) / 2).copied()
}

/// The median of `values` (the mean of the two middle ones for an even count).
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Each server's 64-writer throughput as a share of ds-server memory mode's in the same round
/// (the same round number, or the same place in the order where none was recorded), so that a
/// machine that drifts between rounds does not tilt the comparison.
fn share_of_memory(appends: &[(&str, Vec<Round<'_>>)], out: &mut String) {
    let Some((_, base)) = appends.iter().find(|(l, _)| *l == BASELINE) else {
        return;
    };
    let cells = [(64, 1), (64, 100)];
    let mut rows = Vec::new();
    for (label, runs) in appends.iter().filter(|(l, _)| *l != BASELINE) {
        let mut row = format!("| {label} |");
        for (w, s) in cells {
            let mut shares: Vec<f64> = runs
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let b = match r.number {
                        Some(n) => base.iter().find(|b| b.number == Some(n))?,
                        None => base.get(i)?,
                    };
                    let (c, m) = (cell(&r.cells, w, s)?, cell(&b.cells, w, s)?);
                    (m.appends_per_sec > 0.0).then(|| 100.0 * c.appends_per_sec / m.appends_per_sec)
                })
                .collect();
            let (lo, hi) = shares
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            match median(&mut shares) {
                Some(m) if shares.len() > 1 => {
                    let _ = write!(
                        row,
                        " **{m:.1}%** ({lo:.1}–{hi:.1}%, {} rounds) |",
                        shares.len()
                    );
                }
                Some(m) => {
                    let _ = write!(row, " **{m:.1}%** |");
                }
                None => row.push_str(" – |"),
            }
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return;
    }
    let how = if base.len() > 1 {
        " (the median of the rounds, their range in brackets)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "\nThroughput as a share of {BASELINE} mode's in the same round{how}:\n\n\
         | server | 64 writers · 1 stream | 64 writers · 100 streams |\n|---|---|---|"
    );
    for row in rows {
        out.push_str(&row);
        out.push('\n');
    }
    let mut steal: Vec<f64> = appends
        .iter()
        .flat_map(|(_, runs)| runs.iter())
        .flat_map(|round| round.cells.iter())
        .filter(|c| c.writers == 64)
        .filter_map(|c| c.steal_percent)
        .collect();
    let max = steal.iter().copied().fold(0.0, f64::max);
    if let Some(m) = median(&mut steal) {
        let _ = writeln!(
            out,
            "\nCPU time the hypervisor gave to other guests during these 64-writer cells (steal, \
             from `/proc/stat`): median {m:.1}%, highest {max:.1}% (each server's in table b). \
             Where it is high, the cells of that minute ran slower."
        );
    }
}

/// Renders every table.
pub fn markdown(records: &[Record]) -> String {
    let mut out = String::new();
    let labels = labels_in_order(records);

    out.push_str(
        "#### Servers\n\n| server | mode and what an acknowledged append means |\n|---|---|\n",
    );
    for label in &labels {
        let about = records
            .iter()
            .filter(|r| r.label == *label)
            .find_map(|r| r.about.clone())
            .unwrap_or_default();
        let skipped = records.iter().find_map(|r| match &r.outcome {
            Outcome::Skipped { reason } if r.label == *label => Some(reason.clone()),
            _ => None,
        });
        match skipped {
            Some(reason) => {
                let _ = writeln!(out, "| {label} | skipped: {} |", reason.replace('\n', " "));
            }
            None => {
                let _ = writeln!(out, "| {label} | {about} |");
            }
        }
    }

    let appends = append_rounds(records);
    let matrix = [(1, 1), (1, 100), (64, 1), (64, 100)];
    let rounds = appends.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let first = appends
        .first()
        .and_then(|(_, r)| r.first())
        .and_then(|round| round.cells.first());
    if let Some(first) = first {
        let how = if rounds > 1 {
            format!(
                "; each cell is the median of {rounds} rounds; in a round every server runs each cell in turn before the next cell"
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "\n#### a. Append throughput and latency ({}-byte appends, {:.1} s per cell after warm-up{how})\n",
            first.payload_bytes, first.measured_secs
        );
        out.push_str("| server |");
        for (w, s) in matrix {
            let _ = write!(
                out,
                " {w} writer{} · {s} stream{} |",
                if w == 1 { "" } else { "s" },
                if s == 1 { "" } else { "s" }
            );
        }
        out.push_str("\n|---|---|---|---|---|\n");
        for (label, runs) in &appends {
            let _ = write!(out, "| {label} |");
            for (w, s) in matrix {
                match median_cell(runs, w, s) {
                    Some(c) => {
                        let _ = write!(
                            out,
                            " **{}** · p50 {} · p99 {}{} |",
                            fmt_rate(c.appends_per_sec),
                            fmt_us(c.latency.p50_us),
                            fmt_us(c.latency.p99_us),
                            if c.errors > 0 {
                                format!(" · {} errors", c.errors)
                            } else {
                                String::new()
                            }
                        );
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        share_of_memory(&appends, &mut out);
    }
    problems(records, "append", &mut out);

    if !appends.is_empty() {
        out.push_str(
            "\n#### b. Server CPU per append (µs of server user+system CPU per 100-byte append, from the cells of table a)\n\n\
             | server | 64 writers · 1 stream | 64 writers · 100 streams | 1 writer · 1 stream | load generator CPU, 64 writers · 1 stream | steal, 64 writers · 1 / 100 streams |\n\
             |---|---|---|---|---|---|\n",
        );
        for (label, runs) in &appends {
            let v = |w, s| {
                median_cell(runs, w, s)
                    .map(|c| format!("{:.1}", c.server_cpu_us_per_append))
                    .unwrap_or_else(|| "–".into())
            };
            let client = median_cell(runs, 64, 1)
                .map(|c| format!("{:.1}", c.client_cpu_us_per_append))
                .unwrap_or_else(|| "–".into());
            let steal = |w, s| {
                median_cell(runs, w, s)
                    .and_then(|c| c.steal_percent)
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(|| "–".into())
            };
            let _ = writeln!(
                out,
                "| {label} | **{}** | {} | {} | {client} | {} / {} |",
                v(64, 1),
                v(64, 100),
                v(1, 1),
                steal(64, 1),
                steal(64, 100)
            );
        }
    }

    let fanouts: Vec<(&str, &FanoutResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Fanout { runs } => Some(runs.iter().map(move |f| (r.label.as_str(), f))),
            _ => None,
        })
        .flatten()
        .collect();
    if let Some((_, first)) = fanouts.first() {
        let _ = writeln!(
            out,
            "\n#### c. Live SSE fan-out (one writer at {} msg/s, {} messages; latency = append sent → record parsed by the reader)\n",
            first.messages_per_sec, first.messages
        );
        out.push_str(
            "| server | readers | connected | readers with every message, in order | delivered / expected | p50 | p99 | max | writer append p99 |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for (label, f) in &fanouts {
            let _ = writeln!(
                out,
                "| {label} | {} | {} | **{}** | {} / {} | {} | **{}** | {} | {} |",
                f.readers,
                f.connected,
                f.complete_readers,
                f.delivered,
                f.expected,
                fmt_us(f.latency.p50_us),
                fmt_us(f.latency.p99_us),
                fmt_us(f.latency.max_us),
                if f.append_latency.count == 0 {
                    "–".to_owned()
                } else {
                    fmt_us(f.append_latency.p99_us)
                },
            );
        }
        let errors: Vec<String> = fanouts
            .iter()
            .filter_map(|(label, f)| {
                f.first_error.as_ref().map(|e| {
                    format!(
                        "- {label}, {} readers: first error: {}",
                        f.readers,
                        e.replace('\n', " ")
                    )
                })
            })
            .collect();
        list_after_table(&errors, &mut out);
    }
    problems(records, "fanout", &mut out);

    let idles: Vec<(&str, &IdleResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Idle { result } => Some((r.label.as_str(), result)),
            _ => None,
        })
        .collect();
    if !idles.is_empty() {
        out.push_str(
            "\n#### d. Idle live readers: server RSS per reader\n\n\
             | server | idle SSE readers | bytes per SSE reader | idle long-poll readers | bytes per long-poll reader |\n\
             |---|---|---|---|---|\n",
        );
        for label in &labels {
            let find = |kind| {
                idles
                    .iter()
                    .find(|(l, r)| l == label && r.kind == kind)
                    .map(|(_, r)| r)
            };
            let (sse, lp) = (find(ReaderKind::Sse), find(ReaderKind::LongPoll));
            if sse.is_none() && lp.is_none() {
                continue;
            }
            let show = |r: Option<&&IdleResult>| match r {
                None => ("–".to_owned(), "–".to_owned()),
                Some(r) => {
                    let parked = if r.parked == r.readers {
                        format!("{}", r.readers)
                    } else {
                        format!("{} of {} parked", r.parked, r.readers)
                    };
                    let early = if r.answered_early > 0 {
                        format!(" ({} answered early)", r.answered_early)
                    } else {
                        String::new()
                    };
                    (parked, format!("**{:.0}**{early}", r.bytes_per_reader))
                }
            };
            let (sn, sb) = show(sse);
            let (ln, lb) = show(lp);
            let _ = writeln!(out, "| {label} | {sn} | {sb} | {ln} | {lb} |");
        }
    }
    problems(records, "idle-sse", &mut out);
    problems(records, "idle-long-poll", &mut out);

    let catchups: Vec<(&str, &CatchupResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Catchup { result } => Some((r.label.as_str(), result)),
            _ => None,
        })
        .collect();
    if let Some((_, first)) = catchups.first() {
        let _ = writeln!(
            out,
            "\n#### e. Catch-up read throughput (one connection, from offset -1 to `Stream-Up-To-Date`, {} passes)\n",
            first.passes
        );
        out.push_str(
            "| server | records | stream | fill | read, mean of passes | best pass | pages per pass |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for (label, c) in &catchups {
            let record = if c.append_bytes >= 1 << 20 && c.append_bytes % (1 << 20) == 0 {
                format!("{} MiB", c.append_bytes >> 20)
            } else if c.append_bytes >= 1 << 10 && c.append_bytes % (1 << 10) == 0 {
                format!("{} KiB", c.append_bytes >> 10)
            } else {
                format!("{} B", c.append_bytes)
            };
            let _ = writeln!(
                out,
                "| {label} | {record} | {} MiB | {:.0} MB/s | **{:.2} GB/s** | {:.2} GB/s | {} |",
                c.stream_bytes >> 20,
                c.fill_mb_per_sec,
                c.mean_gb_per_sec,
                c.best_gb_per_sec,
                c.pages_per_pass
            );
        }
    }
    problems(records, "catchup", &mut out);

    let stored: Vec<(&str, &crate::records::RecordsResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Records { result } => Some((r.label.as_str(), result)),
            _ => None,
        })
        .collect();
    if !stored.is_empty() {
        out.push_str(
            "\n#### h. RAM per stored record (server RSS growth over the fill, payload included)\n\n\
             | server | records | streams | payload | fill | RSS before → after | **per record** |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for (label, r) in &stored {
            let _ = writeln!(
                out,
                "| {label} | {}{} | {} | {} B | {:.1} s | {:.0} → {:.0} MB | **{:.0} B** ({:.2}× the payload) |",
                fmt_count(r.records as f64),
                if r.capped { " (time cap)" } else { "" },
                r.streams,
                r.payload_bytes,
                r.fill_secs,
                r.rss_before_bytes as f64 / 1e6,
                r.rss_after_bytes as f64 / 1e6,
                r.bytes_per_record,
                r.bytes_per_record / r.payload_bytes.max(1) as f64
            );
        }
    }
    problems(records, "records", &mut out);

    let restarts: Vec<(&str, &crate::restart::RestartResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Restart { result } => Some((r.label.as_str(), result)),
            _ => None,
        })
        .collect();
    if !restarts.is_empty() {
        out.push_str(
            "\n#### i. Restart after many appends (one stream, 64 writers; restart = spawn to `HEAD` \
             answering with the tail the fill ended at; RSS of the restarted server before any read)\n\n\
             | server | appends | fill | restart after `kill -9` | restart after a clean stop | \
             RSS empty → after the clean restart | **RAM per stored append** | read back after `kill -9` / after the clean stop |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for (label, r) in &restarts {
            let _ = writeln!(
                out,
                "| {label} | {}{} of {} B | {:.1} s | **{}** | **{}** | {:.1} → {:.1} MB | **{:.2} B** | {} / {} |",
                fmt_count(r.records as f64),
                if r.capped { " (time cap)" } else { "" },
                r.payload_bytes,
                r.fill_secs,
                fmt_secs(r.crash.ready_secs),
                fmt_secs(r.clean.ready_secs),
                r.rss_empty_bytes as f64 / 1e6,
                r.clean.rss_bytes as f64 / 1e6,
                r.bytes_per_record,
                read_back(&r.crash),
                read_back(&r.clean),
            );
        }
    }
    problems(records, "restart", &mut out);

    let syncs: Vec<(&str, &SyncResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Sync { result } => Some((r.label.as_str(), result)),
            _ => None,
        })
        .collect();
    if let Some((_, first)) = syncs.first() {
        let _ = writeln!(
            out,
            "\n#### f. ds-sync: mirroring into Postgres ({}-byte JSON messages; lag = append sent → row seen committed)\n",
            first.message_bytes
        );
        out.push_str("| server | measurement | rows | result |\n|---|---|---|---|\n");
        for (label, result) in &syncs {
            for c in &result.catchup {
                let connections = match c.max_connections {
                    Some(n) => format!("{n} connections"),
                    None => "default connections".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "| {label} | catch-up, {} stream{}{} | {} | **{} rows/s** ({:.1} s; ds-sync CPU {:.1} µs/row) |",
                    c.streams,
                    if c.streams == 1 { "" } else { "s" },
                    if c.streams == 1 {
                        String::new()
                    } else {
                        format!(", {connections}")
                    },
                    c.rows,
                    fmt_count(c.rows_per_sec),
                    c.secs,
                    c.worker_cpu_us_per_row
                );
            }
            for l in &result.lag {
                let _ = writeln!(
                    out,
                    "| {label} | lag, {} stream{} at {} appends/s for {:.0} s | {} | p50 {} · **p99 {}** · max {} |",
                    l.streams,
                    if l.streams == 1 { "" } else { "s" },
                    l.appends_per_sec,
                    l.secs,
                    l.rows,
                    fmt_us(l.lag.p50_us),
                    fmt_us(l.lag.p99_us),
                    fmt_us(l.lag.max_us)
                );
            }
        }
    }
    problems(records, "sync", &mut out);

    let subs: Vec<(&str, &crate::subscriptions::SubscriptionsResult)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Subscriptions { result } => Some((r.label.as_str(), result.as_ref())),
            _ => None,
        })
        .collect();
    if let Some((_, first)) = subs.first() {
        let _ = writeln!(
            out,
            "\n#### g. Subscriptions: appends with {} pull-wake pattern subscriptions matching every stream ({} writers, {} streams, cells in the order without, with, without), and append-to-wake latency\n",
            first.subscriptions, first.with.writers, first.with.streams
        );
        out.push_str(
            "| server | without (before) | with | without (after) | with / mean without | server CPU per append, with / without | append → wake event (long-poll reader) |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for (label, g) in &subs {
            let base = (g.without_before.appends_per_sec + g.without_after.appends_per_sec) / 2.0;
            let cpu_base = (g.without_before.server_cpu_us_per_append
                + g.without_after.server_cpu_us_per_append)
                / 2.0;
            let _ = writeln!(
                out,
                "| {label} | {} /s | {} /s | {} /s | **{:.1}%** | {:.1} / {:.1} µs ({:+.1}%) | p50 {} · **p99 {}** · max {} ({} samples) |",
                fmt_count(g.without_before.appends_per_sec),
                fmt_count(g.with.appends_per_sec),
                fmt_count(g.without_after.appends_per_sec),
                100.0 * g.with.appends_per_sec / base,
                g.with.server_cpu_us_per_append,
                cpu_base,
                100.0 * (g.with.server_cpu_us_per_append / cpu_base - 1.0),
                fmt_us(g.wake_latency.p50_us),
                fmt_us(g.wake_latency.p99_us),
                fmt_us(g.wake_latency.max_us),
                g.wake_latency.count
            );
        }
    }
    problems(records, "subscriptions", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;

    fn cell(writers: usize, streams: usize, rate: f64, p50_us: f64) -> CellResult {
        CellResult {
            writers,
            streams,
            payload_bytes: 100,
            measured_secs: 5.0,
            appends: rate as u64 * 5,
            appends_per_sec: rate,
            errors: 0,
            first_error: None,
            latency: Latency {
                count: rate as u64 * 5,
                p50_us,
                p99_us: p50_us * 3.0,
                max_us: p50_us * 10.0,
            },
            server_cpu_us_per_append: 10.0,
            client_cpu_us_per_append: 5.0,
            steal_percent: Some(rate / 10_000.0),
        }
    }

    fn round(label: &str, one: f64, hundred: f64) -> Record {
        Record {
            label: label.into(),
            about: None,
            round: None,
            outcome: Outcome::Append {
                cells: vec![cell(64, 1, one, one / 100.0), cell(64, 100, hundred, 1.0)],
            },
        }
    }

    /// Three rounds in turn of memory mode (100k, 50k, 80k on 1 stream; 100k on 100) and
    /// `label` with `other`'s (1 stream, 100 streams) throughputs.
    fn in_turn(label: &str, other: [(f64, f64); 3]) -> Vec<Record> {
        [100_000.0, 50_000.0, 80_000.0]
            .into_iter()
            .zip(other)
            .flat_map(|(memory, (one, hundred))| {
                [
                    round(BASELINE, memory, 100_000.0),
                    round(label, one, hundred),
                ]
            })
            .collect()
    }

    #[test]
    fn a_cell_is_the_median_round_whole() {
        let records = in_turn(
            "ds-server file-durable",
            [
                (40_000.0, 55_000.0),
                (30_000.0, 45_000.0),
                (90_000.0, 50_000.0),
            ],
        );
        let rounds = append_rounds(&records);
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[1].1.len(), 3);
        let median = median_cell(&rounds[0].1, 64, 1).unwrap();
        assert_eq!(median.appends_per_sec, 80_000.0);
        // Its latency comes from the same round, not from another one.
        assert_eq!(median.latency.p50_us, 800.0);
        // An even count takes the lower middle round.
        assert_eq!(
            median_cell(&rounds[1].1[..2], 64, 1)
                .unwrap()
                .appends_per_sec,
            30_000.0
        );
        assert!(median_cell(&rounds[0].1, 1, 1).is_none());
    }

    #[test]
    fn the_share_of_memory_mode_is_taken_round_by_round() {
        let records = in_turn(
            "ds-server acid",
            [
                (40_000.0, 55_000.0),
                (30_000.0, 45_000.0),
                (44_000.0, 50_000.0),
            ],
        );
        let text = markdown(&records);
        // Per round 40%, 60%, 55%: the median is 55%, though the medians of the two columns
        // (40k over 80k) would say 50%.
        assert!(
            text.contains("| ds-server acid | **55.0%** (40.0–60.0%, 3 rounds) | **50.0%** (45.0–55.0%, 3 rounds) |"),
            "{text}"
        );
        assert!(
            text.contains("each cell is the median of 3 rounds"),
            "{text}"
        );
        let shares = &text[text.find("share of").unwrap()..text.find("#### b.").unwrap()];
        assert!(
            !shares.contains(&format!("| {BASELINE} |")),
            "memory mode is not compared with itself: {shares}"
        );
        // Steal over every 64-writer cell of every server and round (the fixture's steal is the
        // rate over 10 000: 3% to 10%), and each server's median cell's in table b.
        assert!(shares.contains("median 5."), "{shares}");
        assert!(shares.contains("highest 10.0%"), "{shares}");
        assert!(text.contains("| 4.0% / 5.0% |"), "{text}");
    }

    /// run.sh measures cell by cell, every server in turn: one record per server, cell and
    /// round, in an order that mixes servers and rounds.
    #[test]
    fn cells_of_one_round_merge_and_shares_pair_by_round_number() {
        let one_cell = |label: &str, round: u32, streams: usize, rate: f64| Record {
            label: label.into(),
            about: None,
            round: Some(round),
            outcome: Outcome::Append {
                cells: vec![cell(64, streams, rate, 1.0)],
            },
        };
        let records = vec![
            one_cell("ds-server acid", 1, 1, 30_000.0),
            one_cell(BASELINE, 1, 1, 60_000.0),
            one_cell(BASELINE, 1, 100, 80_000.0),
            one_cell("ds-server acid", 1, 100, 60_000.0),
            // Round 2: memory mode slow (the machine was), acid measured in the same minutes.
            one_cell(BASELINE, 2, 1, 40_000.0),
            one_cell("ds-server acid", 2, 1, 24_000.0),
            one_cell("ds-server acid", 2, 100, 28_000.0),
            one_cell(BASELINE, 2, 100, 40_000.0),
        ];
        let rounds = append_rounds(&records);
        assert_eq!(rounds.len(), 2, "two servers");
        for (label, runs) in &rounds {
            assert_eq!(runs.len(), 2, "{label}: two rounds");
            assert!(
                runs.iter().all(|r| r.cells.len() == 2),
                "{label}: two cells a round"
            );
        }
        let text = markdown(&records);
        // Round 1: 50% and 75%; round 2: 60% and 70%. Medians of two: 55% and 72.5%.
        assert!(
            text.contains("| ds-server acid | **55.0%** (50.0–60.0%, 2 rounds) | **72.5%** (70.0–75.0%, 2 rounds) |"),
            "{text}"
        );
        // A round memory mode lacks is not compared with another round.
        let mut lone = records;
        lone.push(one_cell("ds-server acid", 3, 1, 1_000.0));
        let text = markdown(&lone);
        assert!(text.contains("(50.0–60.0%, 2 rounds)"), "{text}");
    }

    #[test]
    fn one_round_and_no_baseline() {
        let one = markdown(&[
            round(BASELINE, 100_000.0, 90_000.0),
            round("electric wal", 45_000.0, 45_000.0),
        ]);
        assert!(
            one.contains("| electric wal | **45.0%** | **50.0%** |"),
            "{one}"
        );
        assert!(!one.contains("median of"), "{one}");
        let none = markdown(&[round("electric wal", 45_000.0, 45_000.0)]);
        assert!(!none.contains("share of"), "{none}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn a_restart_row_shows_both_restarts_and_the_ram_per_stored_append() {
        let check = |ready_secs: f64, rss_bytes: u64| crate::restart::Check {
            ready_secs,
            rss_bytes,
            read_bytes: 1_000_000_000,
            read_secs: 0.8,
            read_error: None,
        };
        let result = crate::restart::RestartResult {
            records: 10_000_000,
            payload_bytes: 100,
            fill_secs: 180.0,
            capped: false,
            rss_empty_bytes: 12_000_000,
            crash: check(0.183, 14_000_000),
            clean: check(0.042, 12_500_000),
            bytes_per_record: 0.05,
        };
        let records = vec![
            Record {
                label: "ds-server file-durable".into(),
                about: None,
                round: None,
                outcome: Outcome::Restart { result },
            },
            Record {
                label: "electric wal".into(),
                about: None,
                round: None,
                outcome: Outcome::Failed {
                    scenario: "restart".into(),
                    error: "after the restart the stream holds 5 bytes".into(),
                },
            },
        ];
        let text = markdown(&records);
        assert!(
            text.contains("#### i. Restart after many appends"),
            "{text}"
        );
        assert!(
            text.contains(
                "| ds-server file-durable | 10.00M of 100 B | 180.0 s | **0.183 s** | **0.042 s** \
                 | 12.0 → 12.5 MB | **0.05 B** | 1.00 GB in 0.8 s / 1.00 GB in 0.8 s |"
            ),
            "{text}"
        );
        let mut refused = check(0.5, 1);
        refused.read_error = Some("GET at offset -1 answered 500 Internal Server Error".into());
        assert_eq!(
            read_back(&refused),
            "refused: GET at offset -1 answered 500 Internal Server Error"
        );
        assert!(
            text.contains(
                "- electric wal: restart failed: after the restart the stream holds 5 bytes"
            ),
            "{text}"
        );
    }
}
