//! Log lines in the launcher's own style, so warnings from deep inside the
//! launcher read like the messages it prints itself: `ringleader: warning:
//! MESSAGE key=value ...`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// An event format that prefixes each line with the program name and the
/// level in words. Verbose logs also show the seconds since the start.
pub struct Format {
    program: &'static str,
    start: Option<std::time::Instant>,
}

impl Format {
    /// Creates the format for `program`, with timestamps when `verbose`.
    pub fn new(program: &'static str, verbose: bool) -> Format {
        Format { program, start: verbose.then(std::time::Instant::now) }
    }
}

/// Returns the word the launcher's own messages use for `level`.
fn level_word(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl<S, N> FormatEvent<S, N> for Format
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "{}: ", self.program)?;
        if let Some(start) = self.start {
            write!(writer, "[{:.3}s] ", start.elapsed().as_secs_f64())?;
        }
        write!(writer, "{}: ", level_word(event.metadata().level()))?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn captured_log(verbose: bool, log: impl FnOnce()) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(Format::new("ringleader", verbose))
            .with_writer(move || sink.clone())
            .with_max_level(Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn warning_reads_like_the_launchers_messages() {
        let text = captured_log(false, || tracing::warn!(rank = 0, "a process outlived its rank"));
        assert_eq!(text, "ringleader: warning: a process outlived its rank rank=0\n");
    }

    #[test]
    fn verbose_lines_show_seconds_since_start() {
        let text = captured_log(true, || tracing::debug!("starting mpirun"));
        assert!(text.starts_with("ringleader: ["), "{text}");
        assert!(text.ends_with("s] debug: starting mpirun\n"), "{text}");
    }
}
