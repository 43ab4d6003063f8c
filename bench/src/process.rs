//! What the server process costs, read from `/proc`: CPU time (utime + stime of the whole thread
//! group) and resident memory (VmRSS). Linux only, like the rest of the harness.

use std::time::Duration;

use anyhow::{Context, anyhow};

/// Kernel clock ticks per second of `/proc/<pid>/stat` (USER_HZ). It is 100 on every Linux
/// architecture we run on; `getconf CLK_TCK` confirms it when available.
fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A process whose cost we read. `pid` `None` means the benchmark's own process.
#[derive(Clone, Debug)]
pub struct Process {
    stat_path: String,
    status_path: String,
    ticks_per_second: u64,
}

impl Process {
    pub fn server(pid: u32) -> Process {
        Process::at(&pid.to_string())
    }

    pub fn this_process() -> Process {
        Process::at("self")
    }

    fn at(pid: &str) -> Process {
        Process {
            stat_path: format!("/proc/{pid}/stat"),
            status_path: format!("/proc/{pid}/status"),
            ticks_per_second: clock_ticks_per_second(),
        }
    }

    /// User plus system CPU time consumed so far by all threads (live and exited).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(&self.stat_path)
            .with_context(|| format!("read {}", self.stat_path))?;
        // The command name (field 2) may contain spaces; fields after its closing ')' are plain.
        let after_comm = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow!("unexpected {} format", self.stat_path))?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // after_comm starts at field 3 (state); utime is field 14 and stime field 15.
        let field = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .ok_or_else(|| anyhow!("{} has no field {n}", self.stat_path))?
                .parse::<u64>()
                .with_context(|| format!("field {n} of {}", self.stat_path))
        };
        let ticks = field(14)? + field(15)?;
        Ok(Duration::from_nanos(
            ticks.saturating_mul(1_000_000_000) / self.ticks_per_second,
        ))
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(&self.status_path)
            .with_context(|| format!("read {}", self.status_path))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or_else(|| anyhow!("{} has no VmRSS", self.status_path))?;
        let kib: u64 = line
            .trim_start_matches("VmRSS:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("VmRSS line {line:?}"))?;
        Ok(kib * 1024)
    }
}

/// The soft limit on open files of this process (from `/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
