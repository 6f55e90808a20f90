//! A small in-memory history for the status page: outbox depth per realm sampled
//! every [`SAMPLE_EVERY`] over the last hour, and today's events per hour (counted
//! from the log incrementally: each refresh counts only events stored since the
//! last one). Lost at restart by design: the log itself is the durable record.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;

/// How often the outbox depth is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// How far back the samples go.
pub const KEEP_MS: i64 = 3_600_000;

#[derive(Default)]
struct Hours {
    /// The UTC day (days since the epoch) the counts are for.
    day: i64,
    /// The highest seq counted so far.
    counted: u64,
    counts: [u64; 24],
}

#[derive(Default)]
pub struct History {
    outbox: Mutex<HashMap<String, VecDeque<(i64, u64)>>>,
    hours: Mutex<HashMap<String, Hours>>,
}

impl History {
    /// Records realm `key`'s outbox depth at `now_ms`, dropping samples older than an hour.
    pub fn sample(&self, key: &str, now_ms: i64, depth: u64) {
        let mut g = self.outbox.lock();
        let q = g.entry(key.to_string()).or_default();
        q.push_back((now_ms, depth));
        while q.front().is_some_and(|(t, _)| *t < now_ms - KEEP_MS) {
            q.pop_front();
        }
    }

    /// The samples of the last hour, oldest first.
    pub fn outbox(&self, key: &str, now_ms: i64) -> Vec<(i64, u64)> {
        self.outbox
            .lock()
            .get(key)
            .map(|q| {
                q.iter()
                    .filter(|(t, _)| *t >= now_ms - KEEP_MS)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Today's (UTC `day`) events per hour for realm `key`. `count(after)` returns
    /// `(hour, count)` pairs of events with seq > `after` stored today and the highest
    /// seq it saw; `day_start_seq` is the last seq stored before today.
    pub fn hours<E>(
        &self,
        key: &str,
        day: i64,
        day_start_seq: u64,
        count: impl FnOnce(u64) -> Result<(Vec<(i64, u64)>, u64), E>,
    ) -> Result<[u64; 24], E> {
        let mut g = self.hours.lock();
        let h = g.entry(key.to_string()).or_default();
        if h.day != day {
            *h = Hours {
                day,
                counted: day_start_seq,
                counts: [0; 24],
            };
        }
        let (rows, max) = count(h.counted)?;
        for (hour, n) in rows {
            if (0..24).contains(&hour) {
                h.counts[hour as usize] += n;
            }
        }
        h.counted = h.counted.max(max);
        Ok(h.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_keeps_an_hour() {
        let h = History::default();
        h.sample("r", 0, 5);
        h.sample("r", 1_000_000, 7);
        h.sample("r", 3_700_000, 9);
        assert_eq!(
            h.outbox("r", 3_700_000),
            vec![(1_000_000, 7), (3_700_000, 9)]
        );
    }

    #[test]
    fn hours_count_incrementally_and_reset_each_day() {
        let h = History::default();
        let c = h
            .hours("r", 10, 100, |after| {
                assert_eq!(after, 100);
                Ok::<_, ()>((vec![(0, 3), (5, 2)], 105))
            })
            .unwrap();
        assert_eq!((c[0], c[5]), (3, 2));
        let c = h
            .hours("r", 10, 100, |after| {
                assert_eq!(after, 105);
                Ok::<_, ()>((vec![(5, 1)], 106))
            })
            .unwrap();
        assert_eq!(c[5], 3);
        let c = h
            .hours("r", 11, 106, |after| {
                assert_eq!(after, 106);
                Ok::<_, ()>((vec![], 106))
            })
            .unwrap();
        assert_eq!(c.iter().sum::<u64>(), 0);
    }
}
