//! Exponential backoff with jitter, shared by ingest (MQTT reconnects) and
//! the uplink (Pulsar sessions). No I/O and no clock: the caller sleeps.
//!
//! The wait is the current step plus up to a quarter of it as jitter; the
//! step doubles after each wait, up to the ceiling, and starts over at
//! [`Backoff::reset`]. The jitter comes from a [`Jitter`] source, random in
//! production and fixed in tests, so tests assert exact waits.
//!
//! Not a crate (`backoff`, `backon`, `exponential-backoff`): those bring
//! retry loops, clocks and async adapters ferry does not use, while both
//! callers need only "the next wait" and "start over", with their own rules
//! for when to start over (ingest after a connection proved good, the
//! uplink after a producer was ready). Forty lines with exact tests cost
//! less than a dependency on the gateway image and its audit.

use std::time::Duration;

/// Where the jitter comes from: given a bound in milliseconds (at least 1),
/// a number below it.
pub type Jitter = fn(u64) -> u64;

/// The production jitter source: uniform below the bound.
pub fn random_jitter(bound: u64) -> u64 {
    rand::random::<u64>() % bound
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// From `min` doubling up to `max`, with random jitter.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff::with_jitter(min, max, random_jitter)
    }

    /// [`Backoff::new`] with the jitter from `jitter`.
    pub fn with_jitter(min: Duration, max: Duration, jitter: Jitter) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
            jitter,
        }
    }

    /// The next wait starts at `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next wait: the current step with up to 25% jitter; the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let bound = base.as_millis() as u64 / 4;
        let jitter = if bound > 0 {
            (self.jitter)(bound).min(bound - 1)
        } else {
            0
        };
        base + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn waits(b: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n).map(|_| b.next_delay().as_millis() as u64).collect()
    }

    #[test]
    fn without_jitter_the_waits_double_up_to_the_ceiling() {
        let mut b = Backoff::with_jitter(ms(100), ms(350), |_| 0);
        assert_eq!(waits(&mut b, 5), [100, 200, 350, 350, 350]);
    }

    #[test]
    fn the_jitter_adds_less_than_a_quarter_of_the_step() {
        let mut b = Backoff::with_jitter(ms(100), ms(350), |bound| bound - 1);
        assert_eq!(waits(&mut b, 4), [124, 249, 436, 436]);
        // A source that overshoots is held below the bound.
        let mut b = Backoff::with_jitter(ms(100), ms(350), |_| u64::MAX);
        assert_eq!(waits(&mut b, 2), [124, 249]);
    }

    #[test]
    fn a_step_too_short_for_jitter_gets_none() {
        let mut b = Backoff::with_jitter(ms(2), ms(3), |_| panic!("no jitter asked"));
        assert_eq!(waits(&mut b, 3), [2, 3, 3]);
    }

    #[test]
    fn reset_starts_over_at_the_minimum() {
        let mut b = Backoff::with_jitter(ms(200), ms(30_000), |_| 0);
        assert_eq!(waits(&mut b, 3), [200, 400, 800]);
        b.reset();
        assert_eq!(waits(&mut b, 2), [200, 400]);
    }

    #[test]
    fn random_jitter_stays_below_its_bound() {
        for bound in [1, 2, 25, 1000] {
            for _ in 0..100 {
                assert!(random_jitter(bound) < bound);
            }
        }
        let mut b = Backoff::new(ms(100), ms(350));
        let d = waits(&mut b, 4);
        assert!((100..125).contains(&d[0]), "{d:?}");
        assert!((200..250).contains(&d[1]), "{d:?}");
        assert!((350..438).contains(&d[2]), "{d:?}");
        assert!((350..438).contains(&d[3]), "{d:?}");
    }
}
