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

/// The machine's CPU time so far, all cores together (the `cpu` line of `/proc/stat`), in ticks:
/// everything, and the part the hypervisor gave to other guests while this one wanted to run
/// (steal). On a shared VM steal is what makes cells minutes apart disagree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCpu {
    pub total: u64,
    pub steal: u64,
}

impl MachineCpu {
    pub fn now() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        MachineCpu::parse(&stat)
    }

    fn parse(stat: &str) -> anyhow::Result<MachineCpu> {
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already counted in user and nice.
        let values = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("/proc/stat value {v:?}"))
            })
            .collect::<anyhow::Result<Vec<u64>>>()?;
        if values.len() < 8 {
            return Err(anyhow!(
                "/proc/stat cpu line has {} values: {line:?}",
                values.len()
            ));
        }
        Ok(MachineCpu {
            total: values.iter().sum(),
            steal: values[7],
        })
    }

    /// Percent of the machine's CPU time stolen between `self` and the later `end`.
    pub fn steal_percent(&self, end: &MachineCpu) -> f64 {
        let total = end.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * end.steal.saturating_sub(self.steal) as f64 / total as f64
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_share_of_all_cpu_time_between_two_readings() {
        let a = MachineCpu::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            a,
            MachineCpu {
                total: 1000,
                steal: 40
            }
        );
        let b = MachineCpu::parse("cpu  200 0 100 1500 20 0 0 140 7 0\n").unwrap();
        // 960 ticks passed, 100 of them stolen; guest time (7) is not counted twice.
        assert_eq!(b.total, 1960);
        assert!((a.steal_percent(&b) - 100.0 * 100.0 / 960.0).abs() < 1e-9);
        assert_eq!(a.steal_percent(&a), 0.0);
        assert!(MachineCpu::parse("cpu0 1 2 3\n").is_err());
        assert!(MachineCpu::parse("cpu  1 2 3\n").is_err());
    }
}
