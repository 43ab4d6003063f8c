//! Exact percentiles over recorded samples (sorted, not bucketed: the sample counts here fit in
//! memory, and an exact p99 is one less thing to explain).

use serde::{Deserialize, Serialize};

/// Latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Summarises samples given in nanoseconds; sorts them in place.
pub fn summarize_ns(samples: &mut [u64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        let idx = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[idx] as f64 / 1_000.0
    };
    Latency {
        count: samples.len() as u64,
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

/// Summarises samples given in microseconds; sorts them in place.
pub fn summarize_us(samples: &mut [u32]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        let idx = ((samples.len() - 1) as f64 * q).round() as usize;
        f64::from(samples[idx])
    };
    Latency {
        count: samples.len() as u64,
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).map(|x| x * 1_000).collect();
        let l = summarize_ns(&mut v);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50_us, 51.0);
        assert_eq!(l.p99_us, 99.0);
        assert_eq!(l.max_us, 100.0);
    }

    #[test]
    fn empty_samples_summarise_to_zero() {
        assert_eq!(summarize_us(&mut []).count, 0);
    }
}
