//! A progress bar on stderr: count, rate, ETA and a caller's message. Redrawn in place on a terminal at most
//! ten times a second; in a log, one line per tenth of the work.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    unit: String,
    total: u64,
    start: Instant,
    last: Instant,
    tty: bool,
    last_tenth: u64,
}

fn hms(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl Progress {
    pub fn new(label: &str, unit: &str, total: u64) -> Self {
        let now = Instant::now();
        Self {
            label: label.into(),
            unit: unit.into(),
            total,
            start: now,
            last: now - Duration::from_secs(1),
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    /// `done` of `total` finished; `rate_items` of the work's unit per finished count (e.g. images per step).
    pub fn update(&mut self, done: u64, rate_items: f64, message: &str) {
        let now = Instant::now();
        let finished = done >= self.total;
        let tenth = done * 10 / self.total.max(1);
        if self.tty && !finished && now - self.last < Duration::from_millis(100) {
            return;
        }
        if !self.tty && !finished && tenth == self.last_tenth {
            return;
        }
        self.last = now;
        self.last_tenth = tenth;
        let el = (now - self.start).as_secs_f64().max(1e-9);
        let rate = done as f64 * rate_items / el;
        let eta = if done > 0 {
            el / done as f64 * (self.total - done.min(self.total)) as f64
        } else {
            0.0
        };
        let width = 24;
        let fill = (done as usize * width / self.total.max(1) as usize).min(width);
        let bar: String = "#".repeat(fill) + &"-".repeat(width - fill);
        let line = format!(
            "{} {done}/{} [{bar}] {message} {rate:.1} {}/s elapsed {} ETA {}",
            self.label,
            self.total,
            self.unit,
            hms(el),
            hms(eta)
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if finished {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}
