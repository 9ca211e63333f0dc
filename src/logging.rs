//! A small stderr logger behind the [`log`] facade, for the `herald` binary.
//!
//! The library logs through `log`'s macros only; a program embedding it may
//! install any logger it likes instead of this one. [`init`] installs this
//! one (the `herald` commands call it with `--log-level`).
//!
//! The event loops must never block on a log write, so [`Log::log`] only
//! formats the record into a `String` and `try_send`s it to a bounded
//! channel of [`CAPACITY`] lines; one writer thread drains the channel onto
//! stderr, a line per write, in the order the lines were queued. When the
//! channel is full the line is dropped and counted, and the writer prints
//! `herald: N log lines dropped` where the lines went missing.
//!
//! Lines still queued when the process exits are lost, so call [`flush`]
//! before exiting (returning from `main` or `std::process::exit`).
//!
//! Format: the message exactly as written, one line per record, so the
//! first line of `herald node` and `herald decision` (their bound
//! addresses) stays parseable; warnings and errors get a `WARN ` or `ERROR `
//! prefix, and records from other crates (mio at `trace`) their target.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines the channel holds; a line logged while it is full is dropped.
pub const CAPACITY: usize = 4096;

/// What the writer thread is handed.
enum Item {
    /// A formatted line (with its newline), after `dropped` lost ones.
    Line { dropped: u64, text: String },
    /// Everything before this is written: say so on the sender.
    Flush { dropped: u64, done: Sender<()> },
}

/// The producing side: the sender of the channel and the count of lines
/// dropped since the last one that got through.
struct Logger {
    tx: Sender<Item>,
    dropped: AtomicU64,
}

impl Logger {
    /// A logger and the receiving end its writer must drain.
    fn new(capacity: usize) -> (Logger, Receiver<Item>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (Logger { tx, dropped: AtomicU64::new(0) }, rx)
    }

    /// Queues one line without blocking, or counts it as dropped. The line
    /// carries the number dropped before it, so the notice lands in place.
    fn queue(&self, text: String) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        match self.tx.try_send(Item::Line { dropped, text }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(dropped + 1, Ordering::Relaxed);
            }
        }
    }

    /// Blocks until every line queued before the call is written.
    fn flush_all(&self) {
        let (done, written) = crossbeam_channel::bounded(1);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if self.tx.send(Item::Flush { dropped, done }).is_ok() {
            // An error means the writer is gone; nothing more can be written.
            let _ = written.recv();
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            self.queue(format_record(record));
        }
    }

    fn flush(&self) {
        self.flush_all();
    }
}

/// One record as one line, newline included.
fn format_record(record: &Record<'_>) -> String {
    let mut line = String::with_capacity(96);
    match record.level() {
        Level::Error => line.push_str("ERROR "),
        Level::Warn => line.push_str("WARN "),
        Level::Info | Level::Debug | Level::Trace => {}
    }
    let target = record.target();
    if target != "herald" && !target.starts_with("herald::") {
        let _ = write!(line, "{target}: ");
    }
    let _ = writeln!(line, "{}", record.args());
    line
}

/// The writer thread: each line is one `write_all` (on stderr, one locked
/// write), preceded by the dropped-lines notice if lines were lost before it.
fn write_items(rx: Receiver<Item>, mut out: impl Write) {
    let notice = |out: &mut dyn Write, dropped: u64| {
        if dropped > 0 {
            let _ = out.write_all(format!("herald: {dropped} log lines dropped\n").as_bytes());
        }
    };
    for item in rx {
        match item {
            Item::Line { dropped, text } => {
                notice(&mut out, dropped);
                let _ = out.write_all(text.as_bytes());
            }
            Item::Flush { dropped, done } => {
                notice(&mut out, dropped);
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the stderr logger (starting its writer thread the first time)
/// and sets the maximum level. Safe to call again: later calls only change
/// the level. If the program already installed another logger, that one
/// stays and only the level is set.
pub fn init(level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| {
        let (logger, rx) = Logger::new(CAPACITY);
        let spawned = std::thread::Builder::new()
            .name("herald-log".into())
            .spawn(move || write_items(rx, std::io::stderr()));
        if let Err(e) = spawned {
            // Without a writer every line counts as dropped; say why once.
            eprintln!("herald: cannot start the log writer thread: {e}");
        }
        logger
    });
    // Err: a logger is already installed (this one, or the program's own).
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// Blocks until every line logged so far (from any thread) is on stderr.
/// Call it before the process exits; a no-op if [`init`] was never called.
/// Not for the event loops: it waits for the writer.
pub fn flush() {
    if let Some(logger) = LOGGER.get() {
        logger.flush_all();
    }
}

/// Parses a `--log-level`: `error`, `warn`, `info`, `debug` or `trace`
/// (any case).
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(format!("`{s}` is not a log level; use error, warn, info, debug or trace")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    fn line(level: Level, target: &str, msg: &str) -> String {
        format_record(&Record::builder().level(level).target(target).args(format_args!("{msg}")).build())
    }

    #[test]
    fn records_print_as_their_message() {
        let m = "herald node n1: mesh link to n2 up";
        assert_eq!(line(Level::Info, "herald::node", m), format!("{m}\n"));
        assert_eq!(line(Level::Debug, "herald", m), format!("{m}\n"));
        assert_eq!(line(Level::Warn, "herald::node::mesh", m), format!("WARN {m}\n"));
        assert_eq!(line(Level::Error, "herald", m), format!("ERROR {m}\n"));
        assert_eq!(line(Level::Trace, "mio::poll", "registering"), "mio::poll: registering\n");
    }

    #[test]
    fn full_channel_drops_count_and_order_holds() {
        let (logger, rx) = Logger::new(2);
        for i in 1..=4 {
            logger.queue(format!("{i}\n"));
        }
        // 1 and 2 fit; 3 and 4 were dropped while nothing drained. Take 1
        // off by hand, so that 5 fits and carries the count of 3 and 4.
        assert!(matches!(rx.try_recv(), Ok(Item::Line { dropped: 0, text }) if text == "1\n"));
        logger.queue("5\n".into());
        let out = Shared::default();
        let sink = out.clone();
        let writer = std::thread::spawn(move || write_items(rx, sink));
        logger.flush_all();
        assert_eq!(out.take(), "2\nherald: 2 log lines dropped\n5\n");
        // Drops after the last line are reported by the next flush.
        logger.dropped.fetch_add(2, Ordering::Relaxed);
        logger.flush_all();
        assert_eq!(out.take(), "herald: 2 log lines dropped\n");
        drop(logger);
        writer.join().unwrap();
    }

    #[test]
    fn flush_waits_for_every_line_from_every_thread() {
        let (logger, rx) = Logger::new(CAPACITY);
        let out = Shared::default();
        let sink = out.clone();
        std::thread::spawn(move || write_items(rx, sink));
        let logger = Arc::new(logger);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let l = logger.clone();
                std::thread::spawn(move || (0..100).for_each(|i| l.queue(format!("{t} {i}\n"))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        logger.flush_all();
        let text = out.take();
        assert_eq!(text.lines().count(), 400, "{text}");
        for t in 0..4 {
            let mine: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{t} "))).collect();
            let want: Vec<String> = (0..100).map(|i| format!("{t} {i}")).collect();
            assert_eq!(mine, want, "one thread's lines stay in order");
        }
    }

    #[test]
    fn init_twice_is_harmless() {
        init(LevelFilter::Warn);
        init(LevelFilter::Info);
        assert_eq!(log::max_level(), LevelFilter::Info);
        log::debug!("not shown");
        flush();
        flush();
    }

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("info"), Ok(LevelFilter::Info));
        assert_eq!(parse_level("WARN"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("trace"), Ok(LevelFilter::Trace));
        assert!(parse_level("verbose").is_err());
        assert!(parse_level("").is_err());
    }
}
