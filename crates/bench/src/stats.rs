//! Order statistics over a set of wall-clock samples.

use serde::Serialize;

/// Summary of one runner × workload cell, all times in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (nearest-rank on the sorted samples; mean of the two middle ones for even n).
    pub median_ms: f64,
    /// 10th percentile (nearest-rank).
    pub p10_ms: f64,
    /// 90th percentile (nearest-rank).
    pub p90_ms: f64,
    /// Fastest sample.
    pub min_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
}

/// Summarise samples; `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        median_ms: median,
        p10_ms: percentile_nearest_rank(&s, 10.0),
        p90_ms: percentile_nearest_rank(&s, 90.0),
        min_ms: s[0],
        max_ms: s[n - 1],
        mean_ms: s.iter().sum::<f64>() / n as f64,
    })
}

/// Nearest-rank percentile of already sorted, non-empty samples.
fn percentile_nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn empty_is_none() {
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn odd_and_even_medians() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (2.0, 1.0, 3.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median_ms, 2.5);
        assert_eq!(s.mean_ms, 2.5);
    }

    #[test]
    fn p90_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summarize(&v).unwrap().p90_ms, 9.0);
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(summarize(&v).unwrap().p90_ms, 18.0);
        assert_eq!(summarize(&[7.0]).unwrap().p90_ms, 7.0);
    }
}
