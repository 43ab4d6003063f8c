//! Command line: `run` one scenario against one server, `wait` for a server, record a `skip`,
//! `report` the results file as Markdown.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{self, Server};
use crate::idle::ReaderKind;
use crate::process::{self, Process};
use crate::report::{self, Outcome, Record};
use crate::restart::{self, Phase};
use crate::{append, catchup, fanout, floor, idle, records, subscriptions, sync};

#[derive(Parser, Debug)]
#[command(
    name = "ds-bench",
    about = "Load generator for Durable Streams servers (driven by bench/run.sh)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one scenario against a running server and append the result to the results file.
    Run(Box<RunArgs>),
    /// Wait until a server answers HTTP (any status).
    Wait {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Scenario c with no server: raw loopback TCP fan-out, the floor any server's row sits on.
    Floor {
        #[arg(long)]
        results: PathBuf,
        #[arg(long, default_value = "loopback floor (raw TCP, no server)")]
        label: String,
        /// Reader counts (both ends of each connection are in this process, so twice the
        /// descriptors).
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        fanout_readers: Vec<usize>,
        /// Messages per second.
        #[arg(long, default_value_t = 100)]
        fanout_rate: u32,
        /// Seconds of sending [10; quick 2].
        #[arg(long)]
        fanout_secs: Option<u64>,
        #[arg(long)]
        quick: bool,
    },
    /// Record that a server or mode was not measured, and why.
    Skip {
        #[arg(long)]
        results: PathBuf,
        #[arg(long)]
        label: String,
        #[arg(long)]
        reason: String,
    },
    /// Print the results file as Markdown tables.
    Report {
        #[arg(long)]
        results: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// a + b: append throughput, latency, server CPU per append.
    Append,
    /// c: live SSE fan-out.
    Fanout,
    /// d: idle SSE readers, server RSS per reader.
    IdleSse,
    /// d: idle long-poll readers, server RSS per reader.
    IdleLongPoll,
    /// e: catch-up read throughput.
    Catchup,
    /// f: ds-sync mirroring into Postgres (needs --sync-bin and --database-url).
    Sync,
    /// g: append cost with pattern subscriptions, and pull-wake latency (ds-server only).
    Subscriptions,
    /// h: server RSS per stored record.
    Records,
    /// i: restart after many appends (run.sh runs it as three steps, see `--restart-step`).
    Restart,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Append => "append",
            Scenario::Fanout => "fanout",
            Scenario::IdleSse => "idle-sse",
            Scenario::IdleLongPoll => "idle-long-poll",
            Scenario::Catchup => "catchup",
            Scenario::Sync => "sync",
            Scenario::Subscriptions => "subscriptions",
            Scenario::Records => "records",
            Scenario::Restart => "restart",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestartStep {
    Fill,
    Crash,
    Clean,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Server base URL, loopback only (e.g. http://127.0.0.1:4437).
    #[arg(long)]
    pub url: String,
    /// PID of the server process (for CPU time and RSS from /proc).
    #[arg(long)]
    pub server_pid: u32,
    /// Row label in the tables, e.g. "ds-server memory".
    #[arg(long)]
    pub label: String,
    /// What the mode promises, shown in the servers table.
    #[arg(long)]
    pub about: Option<String>,
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// JSON-lines results file to append to.
    #[arg(long)]
    pub results: PathBuf,
    /// Short runs for development (defaults below shrink; explicit flags still win).
    #[arg(long)]
    pub quick: bool,
    /// Which round of run.sh's append rounds this is: the report merges the cells of one label
    /// and round (run.sh measures one cell at a time, every server in turn).
    #[arg(long)]
    pub round: Option<u32>,
    /// Stream names are prefixed with this, so runs never collide.
    #[arg(long)]
    pub run_id: Option<String>,

    /// a: measured seconds per cell [5; quick 1].
    #[arg(long)]
    pub append_secs: Option<f64>,
    /// a: warm-up seconds per cell, not measured [1; quick 0.3].
    #[arg(long)]
    pub warmup_secs: Option<f64>,
    /// a: writer counts of the matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub writers: Vec<usize>,
    /// a: stream counts of the matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub streams: Vec<usize>,
    /// a: bytes per append.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// a: hard cap on requests per writer per cell.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_requests_per_writer: u64,

    /// c: reader counts [1000,10000; quick 1000].
    #[arg(long, value_delimiter = ',')]
    pub fanout_readers: Option<Vec<usize>>,
    /// c: writer rate in messages per second.
    #[arg(long, default_value_t = 100)]
    pub fanout_rate: u32,
    /// c: seconds the writer sends [10; quick 2].
    #[arg(long)]
    pub fanout_secs: Option<u64>,

    /// d: idle readers [10000; quick 1000].
    #[arg(long)]
    pub idle_readers: Option<usize>,
    /// d: idle streams the readers are spread over.
    #[arg(long, default_value_t = 100)]
    pub idle_streams: usize,

    /// e: stream size in MiB [256; quick 64].
    #[arg(long)]
    pub catchup_mib: Option<u64>,
    /// e: read passes [3; quick 2].
    #[arg(long)]
    pub catchup_passes: Option<u32>,
    /// e: record (append) sizes in bytes, one stream of `--catchup-mib` each.
    #[arg(long, value_delimiter = ',', default_value = "4096,65536,1048576")]
    pub catchup_record_bytes: Vec<usize>,

    /// h: records stored [1000000; quick 100000] (of `--payload-bytes` each).
    #[arg(long)]
    pub records: Option<u64>,
    /// h: stream counts the records are spread over, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,1000")]
    pub records_streams: Vec<usize>,
    /// h: longest fill in seconds; a slower server is measured over the records it stored by
    /// then (the row is marked capped) [300]
    #[arg(long, default_value_t = 300)]
    pub records_max_secs: u64,

    /// i: which step of the restart scenario: `fill` a fresh server, then `crash` (check the
    /// server restarted after `kill -9`) and `clean` (after a clean stop; writes the result).
    #[arg(long, value_enum)]
    pub restart_step: Option<RestartStep>,
    /// i: the file the steps pass the fill's tail and checks through.
    #[arg(long)]
    pub restart_state: Option<PathBuf>,
    /// i: when run.sh spawned the restarted server (Unix milliseconds).
    #[arg(long)]
    pub spawned_at_ms: Option<u64>,
    /// i: appends stored before the restarts [10000000; quick 200000] (of `--payload-bytes`,
    /// one stream, 64 writers, at most `--records-max-secs`).
    #[arg(long)]
    pub restart_records: Option<u64>,
    /// i: longest wait for a restarted server to serve the stream, and for reading it back.
    #[arg(long, default_value_t = 300)]
    pub restart_timeout_secs: u64,

    /// f: the ds-sync binary (release build).
    #[arg(long)]
    pub sync_bin: Option<PathBuf>,
    /// f: a Postgres the benchmark may create and drop databases in.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// f: messages in the one-stream catch-up [200000; quick 20000].
    #[arg(long)]
    pub sync_rows: Option<usize>,
    /// f: streams in the many-streams catch-up.
    #[arg(long, default_value_t = 1000)]
    pub sync_streams: usize,
    /// f: messages per stream in the many-streams catch-up [100; quick 10].
    #[arg(long)]
    pub sync_rows_per_stream: Option<usize>,
    /// f: appends per second (over all streams) while lag is measured.
    #[arg(long, default_value_t = 500)]
    pub sync_lag_rate: u32,
    /// f: seconds of appends while lag is measured [10; quick 2].
    #[arg(long)]
    pub sync_lag_secs: Option<f64>,
    /// f: give each worker a subscription of its own (`DS_SYNC__SUBSCRIPTION`), so that it acks
    /// what it commits; `false` runs it without one (`DS_SYNC__SUBSCRIPTION=""`: no lease, no
    /// acks), the A/B of acks in one binary.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sync_subscriptions: bool,
    /// f: stream counts of the lag runs.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub sync_lag_streams: Vec<usize>,
    /// g: pattern subscriptions matching every stream of the subscribed cell.
    #[arg(long, default_value_t = 1000)]
    pub subscriptions: usize,
    /// g: writers and streams of the append cells [64 writers, 100 streams].
    #[arg(long, default_value_t = 64)]
    pub subscriptions_writers: usize,
    #[arg(long, default_value_t = 100)]
    pub subscriptions_streams: usize,
    /// g: append-to-wake samples [200; quick 50].
    #[arg(long)]
    pub wake_samples: Option<usize>,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run_scenario(*args)),
        Command::Wait { url, timeout_secs } => {
            let server = Server::from_url(&url)?;
            runtime.block_on(client::wait_until_answering(
                &server,
                Duration::from_secs(timeout_secs),
            ))
        }
        Command::Floor {
            results,
            label,
            fanout_readers,
            fanout_rate,
            fanout_secs,
            quick,
        } => {
            // Both ends of every connection are in this process.
            check_open_files(2 * fanout_readers.iter().copied().max().unwrap_or(0))?;
            let mut runs = Vec::new();
            for readers in fanout_readers {
                eprintln!("  floor: {readers} raw TCP readers");
                let plan = fanout_plan(readers, fanout_rate, fanout_secs, quick);
                runs.push(runtime.block_on(floor::run(&plan)));
            }
            for outcome in split(runs, "fanout", |runs| Outcome::Fanout { runs }) {
                let record = Record {
                    label: label.clone(),
                    about: Some(FLOOR_ABOUT.to_owned()),
                    round: None,
                    outcome,
                };
                report::append_record(&results, &record)?;
            }
            Ok(())
        }
        Command::Skip {
            results,
            label,
            reason,
        } => report::append_record(
            &results,
            &Record {
                label,
                about: None,
                round: None,
                outcome: Outcome::Skipped { reason },
            },
        ),
        Command::Report { results } => {
            print!("{}", report::markdown(&report::read_records(&results)?));
            Ok(())
        }
    }
}

async fn run_scenario(args: RunArgs) -> anyhow::Result<()> {
    let server = Server::from_url(&args.url)?;
    let server_process = Process::server(args.server_pid);
    server_process.cpu_time()?;
    let run_id = args.run_id.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("{t}-{}", std::process::id())
    });
    let q = args.quick;
    let pick = |full: f64, quick: f64| if q { quick } else { full };

    let outcome = match args.scenario {
        Scenario::Sync => {
            let (Some(sync_bin), Some(database_url)) =
                (args.sync_bin.clone(), args.database_url.clone())
            else {
                bail!("--scenario sync needs --sync-bin and --database-url (or DATABASE_URL)");
            };
            let plan = sync::Plan {
                database_url,
                sync_bin,
                log_dir: sync::log_dir_for(&args.results),
                one_stream_rows: args.sync_rows.unwrap_or(if q { 20_000 } else { 200_000 }),
                many_streams: args.sync_streams,
                rows_per_stream: args
                    .sync_rows_per_stream
                    .unwrap_or(if q { 10 } else { 100 }),
                lag_rate: args.sync_lag_rate,
                lag_for: Duration::from_secs_f64(args.sync_lag_secs.unwrap_or(pick(10.0, 2.0))),
                lag_streams: args.sync_lag_streams.clone(),
                subscriptions: args.sync_subscriptions,
                timeout: Duration::from_secs(120),
            };
            one(sync::run(&server, &run_id, &plan).await, "sync", |result| {
                Outcome::Sync { result }
            })
        }
        Scenario::Subscriptions => {
            let plan = subscriptions::Plan {
                subscriptions: args.subscriptions,
                cell: append::CellPlan {
                    writers: args.subscriptions_writers,
                    streams: args.subscriptions_streams,
                    payload_bytes: args.payload_bytes,
                    warmup: Duration::from_secs_f64(args.warmup_secs.unwrap_or(pick(1.0, 0.3))),
                    duration: Duration::from_secs_f64(args.append_secs.unwrap_or(pick(5.0, 1.0))),
                    max_requests_per_writer: args.max_requests_per_writer,
                },
                wake_samples: args.wake_samples.unwrap_or(if q { 50 } else { 200 }),
            };
            eprintln!(
                "  subscriptions: {} pattern subscriptions, {} writers, {} streams",
                plan.subscriptions, plan.cell.writers, plan.cell.streams
            );
            one(
                subscriptions::run(&server, &server_process, &run_id, &plan).await,
                "subscriptions",
                |result| Outcome::Subscriptions {
                    result: Box::new(result),
                },
            )
        }
        Scenario::Append => {
            let mut cells = Vec::new();
            for &writers in &args.writers {
                for &streams in &args.streams {
                    let plan = append::CellPlan {
                        writers,
                        streams,
                        payload_bytes: args.payload_bytes,
                        warmup: Duration::from_secs_f64(args.warmup_secs.unwrap_or(pick(1.0, 0.3))),
                        duration: Duration::from_secs_f64(
                            args.append_secs.unwrap_or(pick(5.0, 1.0)),
                        ),
                        max_requests_per_writer: args.max_requests_per_writer,
                    };
                    eprintln!("  append: {writers} writers, {streams} streams");
                    cells.push(append::run_cell(&server, &server_process, &run_id, &plan).await);
                }
            }
            split(cells, "append", |cells| Outcome::Append { cells })
        }
        Scenario::Fanout => {
            let counts = args
                .fanout_readers
                .clone()
                .unwrap_or_else(|| fanout_counts(q));
            check_open_files(counts.iter().copied().max().unwrap_or(0))?;
            let mut runs = Vec::new();
            for readers in counts {
                let plan = fanout_plan(readers, args.fanout_rate, args.fanout_secs, q);
                eprintln!("  fanout: {readers} SSE readers");
                runs.push(fanout::run(&server, &run_id, &plan).await);
            }
            split(runs, "fanout", |runs| Outcome::Fanout { runs })
        }
        Scenario::IdleSse | Scenario::IdleLongPoll => {
            let readers = args.idle_readers.unwrap_or(if q { 1000 } else { 10_000 });
            check_open_files(readers)?;
            let plan = idle::Plan {
                kind: if args.scenario == Scenario::IdleSse {
                    ReaderKind::Sse
                } else {
                    ReaderKind::LongPoll
                },
                readers,
                streams: args.idle_streams,
                connect_timeout: Duration::from_secs(30 + readers as u64 / 200),
                connect_concurrency: 128,
            };
            eprintln!("  {}: {readers} readers", args.scenario.name());
            one(
                idle::run(&server, &server_process, &run_id, &plan).await,
                args.scenario.name(),
                |result| Outcome::Idle { result },
            )
        }
        Scenario::Catchup => {
            let mib = args.catchup_mib.unwrap_or(if q { 64 } else { 256 });
            let mut out = Vec::new();
            for &append_bytes in &args.catchup_record_bytes {
                let plan = catchup::Plan {
                    fill_bytes: mib << 20,
                    append_bytes,
                    passes: args.catchup_passes.unwrap_or(if q { 2 } else { 3 }),
                    pass_timeout: Duration::from_secs(120),
                };
                eprintln!("  catchup: {mib} MiB of {append_bytes}-byte records");
                out.extend(one(
                    catchup::run(&server, &format!("{run_id}-{append_bytes}"), &plan).await,
                    "catchup",
                    |result| Outcome::Catchup { result },
                ));
            }
            out
        }
        Scenario::Records => {
            let records = args.records.unwrap_or(if q { 100_000 } else { 1_000_000 });
            let mut out = Vec::new();
            for &streams in &args.records_streams {
                let plan = records::Plan {
                    records,
                    streams,
                    payload_bytes: args.payload_bytes,
                    writers: 64,
                    max_fill: std::time::Duration::from_secs(args.records_max_secs),
                };
                eprintln!(
                    "  records: {records} of {} bytes in {streams} streams",
                    args.payload_bytes
                );
                out.extend(one(
                    records::run(&server, &server_process, &run_id, &plan).await,
                    "records",
                    |result| Outcome::Records { result },
                ));
            }
            out
        }
        Scenario::Restart => {
            let outcome = restart_step(&server, &server_process, &run_id, &args).await;
            if let [Outcome::Failed { error, .. }] = outcome.as_slice() {
                // Recorded, and the exit status tells run.sh to skip the steps after it.
                let error = error.clone();
                record_all(&args, outcome)?;
                bail!("restart step failed: {error}");
            }
            outcome
        }
    };
    record_all(&args, outcome)
}

fn record_all(args: &RunArgs, outcome: Vec<Outcome>) -> anyhow::Result<()> {
    for outcome in outcome {
        report::append_record(
            &args.results,
            &Record {
                label: args.label.clone(),
                about: args.about.clone(),
                round: args.round,
                outcome,
            },
        )?;
    }
    Ok(())
}

/// One step of scenario i; only the last (`clean`) has a result to record.
async fn restart_step(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    args: &RunArgs,
) -> Vec<Outcome> {
    let step = async {
        let step = args
            .restart_step
            .ok_or_else(|| anyhow!("--scenario restart needs --restart-step"))?;
        let state = args
            .restart_state
            .clone()
            .ok_or_else(|| anyhow!("--scenario restart needs --restart-state"))?;
        let timeout = Duration::from_secs(args.restart_timeout_secs);
        let phase = match step {
            RestartStep::Fill => {
                let plan = records::Plan {
                    records: args.restart_records.unwrap_or(if args.quick {
                        200_000
                    } else {
                        10_000_000
                    }),
                    streams: 1,
                    payload_bytes: args.payload_bytes,
                    writers: 64,
                    max_fill: Duration::from_secs(args.records_max_secs),
                };
                eprintln!(
                    "  restart: filling {} appends of {} bytes",
                    plan.records, plan.payload_bytes
                );
                restart::fill(server, server_process, run_id, &plan, &state).await?;
                return Ok(None);
            }
            RestartStep::Crash => Phase::Crash,
            RestartStep::Clean => Phase::Clean,
        };
        let spawned_at_ms = args
            .spawned_at_ms
            .ok_or_else(|| anyhow!("--restart-step {step:?} needs --spawned-at-ms"))?;
        restart::check(
            server,
            server_process,
            &state,
            phase,
            spawned_at_ms,
            timeout,
        )
        .await
    };
    match step.await {
        Ok(None) => Vec::new(),
        Ok(Some(result)) => vec![Outcome::Restart { result }],
        Err(e) => vec![failed("restart", &e)],
    }
}

fn failed(scenario: &str, e: &anyhow::Error) -> Outcome {
    eprintln!("  {scenario} failed: {e:#}");
    Outcome::Failed {
        scenario: scenario.to_owned(),
        error: format!("{e:#}"),
    }
}

/// The results that succeeded as one outcome, and each failure as its own.
fn split<T>(
    results: Vec<anyhow::Result<T>>,
    scenario: &str,
    wrap: impl FnOnce(Vec<T>) -> Outcome,
) -> Vec<Outcome> {
    let mut ok = Vec::new();
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => out.push(failed(scenario, &e)),
        }
    }
    if !ok.is_empty() {
        out.insert(0, wrap(ok));
    }
    out
}

fn one<T>(
    result: anyhow::Result<T>,
    scenario: &str,
    wrap: impl FnOnce(T) -> Outcome,
) -> Vec<Outcome> {
    match result {
        Ok(v) => vec![wrap(v)],
        Err(e) => vec![failed(scenario, &e)],
    }
}

/// The floor's line in the servers table.
const FLOOR_ABOUT: &str = "not a server: a thread writing one 160-byte frame per message to each \
    raw loopback TCP connection, read by the same reader tasks (what the kernel and the load \
    generator cost)";

fn fanout_counts(quick: bool) -> Vec<usize> {
    if quick {
        vec![1000]
    } else {
        vec![1000, 10_000]
    }
}

fn fanout_plan(readers: usize, rate: u32, secs: Option<u64>, quick: bool) -> fanout::Plan {
    fanout::Plan {
        readers,
        messages_per_sec: rate,
        send_for: Duration::from_secs(secs.unwrap_or(if quick { 2 } else { 10 })),
        connect_timeout: Duration::from_secs(30 + readers as u64 / 200),
        drain_timeout: Duration::from_secs(10),
        connect_concurrency: 128,
    }
}

fn check_open_files(connections: usize) -> anyhow::Result<()> {
    if let Some(limit) = process::open_files_limit()
        && limit < connections as u64 + 64
    {
        bail!(
            "open files limit is {limit}, {connections} connections need more: raise `ulimit -n` \
             (run.sh does)"
        );
    }
    Ok(())
}
