//! A log writer for the server that costs the logging thread no syscall.
//!
//! The server logs every file it moves, from the thread that commits it.
//! A write(2) per line on that thread costs a noticeable share of a tree
//! of small files; a channel to a writer thread costs a wake-up per line.
//! Instead, lines go into a buffer behind a mutex (uncontended: an atomic
//! operation), and a background thread writes the buffer out a few times a
//! second. A line therefore reaches the log within [`FLUSH_EVERY`]; the
//! buffer is bounded, so a log nobody drains costs lines, never memory or
//! a blocked transfer. [`BufferedLog::flush`] writes out the rest at exit.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Lines beyond this much unwritten text are dropped (and counted).
const MAX_BUFFERED: usize = 4 * 1024 * 1024;

struct Pending {
    text: Vec<u8>,
    dropped: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Held only while writing out, never by a thread that logs.
    out: Mutex<Box<dyn Write + Send>>,
}

/// A `MakeWriter` for tracing-subscriber that buffers lines and writes them
/// from a background thread.
#[derive(Clone)]
pub struct BufferedLog {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BufferedLog {
    pub fn new(out: impl Write + Send + 'static) -> io::Result<BufferedLog> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                text: Vec::new(),
                dropped: 0,
            }),
            out: Mutex::new(Box::new(out)),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("ferry-log".into())
            .spawn(move || {
                while let Some(shared) = weak.upgrade() {
                    BufferedLog { shared }.flush();
                    std::thread::sleep(FLUSH_EVERY);
                }
            })?;
        Ok(BufferedLog { shared })
    }

    /// Write out everything logged so far.
    pub fn flush(&self) {
        let (text, dropped) = {
            let mut p = lock(&self.shared.pending);
            (std::mem::take(&mut p.text), std::mem::take(&mut p.dropped))
        };
        let mut out = lock(&self.shared.out);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "ferry: {dropped} log line(s) dropped: the log is not being read"
            );
        }
        if !text.is_empty() {
            let _ = out.write_all(&text);
            let _ = out.flush();
        }
    }
}

/// One log line being formatted; it joins the buffer when dropped.
pub struct LogLine {
    shared: Arc<Shared>,
    line: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let mut p = lock(&self.shared.pending);
        if p.text.len() + self.line.len() > MAX_BUFFERED {
            p.dropped += 1;
        } else {
            p.text.extend_from_slice(&self.line);
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedLog {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            shared: self.shared.clone(),
            line: Vec::with_capacity(160),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose output the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_and_in_order_after_flush() {
        let sink = Sink::default();
        let log = BufferedLog::new(sink.clone()).unwrap();
        for i in 0..100 {
            let mut line = log.make_writer();
            writeln!(line, "line {i}").unwrap();
        }
        log.flush();
        let text = String::from_utf8(lock(&sink.0).clone()).unwrap();
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn an_undrained_log_drops_lines_and_says_so() {
        let sink = Sink::default();
        let log = BufferedLog::new(sink.clone()).unwrap();
        let line = vec![b'x'; MAX_BUFFERED / 3];
        for _ in 0..4 {
            log.make_writer().write_all(&line).unwrap();
        }
        // Three fit; the fourth is dropped, unless the background thread
        // happened to write the buffer out in between.
        log.flush();
        let text = String::from_utf8_lossy(&lock(&sink.0)).into_owned();
        let written = text.matches('x').count();
        assert!(written >= 3 * line.len(), "kept what fit");
        assert!(written == 4 * line.len() || text.contains("1 log line(s) dropped"));
    }
}
