//! bt-common: job spec types and validation, configuration loading, tracing setup, ids, shutdown.
pub mod config;
pub mod domain;
pub mod ids;
pub mod net;
pub mod paths;
pub mod spec;

pub use ids::{JobId, WorkerId};
pub use spec::{JobKind, JobSpec, SpecError};

/// A secret from configuration (a token): its Debug output never shows it.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as UTC (year, month, day, hour, minute, second, millisecond), by the
/// proleptic Gregorian calendar (400-year eras counted from 0000-03-01).
pub fn utc_parts(ms: i64) -> (i64, i64, i64, i64, i64, i64, i64) {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms_of_day / 1000;
    (
        year,
        month,
        day,
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000,
    )
}

/// Sets up `tracing` for a binary: human-readable lines on stderr, filtered by `RUST_LOG`
/// (default `info`), or JSON lines when `BT_LOG_FORMAT=json`. Every event is one line whatever
/// its fields hold: values a peer sent (a job name with a newline, a trainer's message with
/// terminal escapes) are escaped by [`OneLineWriter`], so nobody can write a forged line into the
/// log. Colours are off for the same reason (an escape sequence is a control character).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BT_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLineWriter(std::io::stderr()))
        .with_ansi(false)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `text` with every control character but a tab escaped (`\n`, `\r`, `\u{1b}`, ...), and the
/// Unicode line and paragraph separators too: what is left is one line.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if bad(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A log writer that keeps each event on one line: the formatter hands it one whole event per
/// write, ending in a newline; anything before that newline is passed through [`one_line`].
pub struct OneLineWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&text[..], ""),
        };
        let line = one_line(body);
        self.0.write_all(line.as_bytes())?;
        self.0.write_all(end.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Resolves when the process receives SIGTERM or ctrl-c (SIGINT): the one shutdown path.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod log_tests {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A job name with a newline, a carriage return and a terminal escape, logged through the
    /// real formatter (text and JSON), stays on the one line of its event.
    #[test]
    fn a_hostile_value_cannot_forge_a_log_line() {
        let hostile = "evil\n2026-01-01T00:00:00Z  INFO job succeeded job_id=x\r\u{1b}[2K\u{2028}";
        for json in [false, true] {
            let buf = Buf::default();
            let w = buf.clone();
            let b = tracing_subscriber::fmt()
                .with_writer(move || super::OneLineWriter(w.clone()))
                .with_ansi(false);
            let sub: Box<dyn tracing::Subscriber + Send + Sync> = if json {
                Box::new(b.json().finish())
            } else {
                Box::new(b.finish())
            };
            tracing::subscriber::with_default(sub, || {
                tracing::info!(name = %hostile, "job submitted");
                tracing::warn!("second event");
            });
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "json={json}: {text:?}");
            assert!(lines[0].contains("job submitted"), "{text}");
            assert!(
                lines[0].contains("job succeeded job_id=x"),
                "kept, escaped: {text}"
            );
            assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
            assert!(!text.contains('\u{2028}'), "{text:?}");
        }
        assert_eq!(super::one_line("a\tb"), "a\tb");
        assert_eq!(super::one_line("a\nb\u{7}"), "a\\nb\\u{7}");
    }
}
