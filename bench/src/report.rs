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
    pub outcome: Outcome,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Outcome {
    Append { cells: Vec<CellResult> },
    Fanout { runs: Vec<FanoutResult> },
    Idle { result: IdleResult },
    Catchup { result: CatchupResult },
    Sync { result: SyncResult },
    Failed { scenario: String, error: String },
    Skipped { reason: String },
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

fn cell(cells: &[CellResult], writers: usize, streams: usize) -> Option<&CellResult> {
    cells
        .iter()
        .find(|c| c.writers == writers && c.streams == streams)
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

    let appends: Vec<(&str, &Vec<CellResult>)> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Append { cells } => Some((r.label.as_str(), cells)),
            _ => None,
        })
        .collect();
    let matrix = [(1, 1), (1, 100), (64, 1), (64, 100)];
    if let Some((_, first)) = appends.first() {
        let payload = first.first().map(|c| c.payload_bytes).unwrap_or(0);
        let secs = first.first().map(|c| c.measured_secs).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "\n#### a. Append throughput and latency ({payload}-byte appends, {secs:.1} s per cell after warm-up)\n"
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
        for (label, cells) in &appends {
            let _ = write!(out, "| {label} |");
            for (w, s) in matrix {
                match cell(cells, w, s) {
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
    }
    problems(records, "append", &mut out);

    if !appends.is_empty() {
        out.push_str(
            "\n#### b. Server CPU per append (µs of server user+system CPU per 100-byte append)\n\n\
             | server | 64 writers · 1 stream | 64 writers · 100 streams | 1 writer · 1 stream | load generator CPU, 64 writers · 1 stream |\n\
             |---|---|---|---|---|\n",
        );
        for (label, cells) in &appends {
            let v = |w, s| {
                cell(cells, w, s)
                    .map(|c| format!("{:.1}", c.server_cpu_us_per_append))
                    .unwrap_or_else(|| "–".into())
            };
            let client = cell(cells, 64, 1)
                .map(|c| format!("{:.1}", c.client_cpu_us_per_append))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                out,
                "| {label} | **{}** | {} | {} | {client} |",
                v(64, 1),
                v(64, 100),
                v(1, 1)
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
            "| server | stream | fill (1 MiB appends) | read, mean of passes | best pass | pages per pass |\n\
             |---|---|---|---|---|---|\n",
        );
        for (label, c) in &catchups {
            let _ = writeln!(
                out,
                "| {label} | {} MiB | {:.0} MB/s | **{:.2} GB/s** | {:.2} GB/s | {} |",
                c.stream_bytes >> 20,
                c.fill_mb_per_sec,
                c.mean_gb_per_sec,
                c.best_gb_per_sec,
                c.pages_per_pass
            );
        }
    }
    problems(records, "catchup", &mut out);

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
    out
}
