//! The lines of a pod's log stream, read as bytes with a cap on each line.
//!
//! A pod decides what its log holds: one line without a newline must not make the agent
//! buffer it whole (an agent that did was OOM-killed, and again after re-attaching), and
//! one byte that is not UTF-8 must not end the stream (every later line was hidden and the
//! stream re-requested every 100 ms). So a line keeps at most [`LINE_CAP`] bytes, the rest
//! of it up to its newline is read and dropped, and bytes are decoded lossily by the
//! caller. Memory per stream is bounded by the cap, whatever the pod prints.

use futures_util::{AsyncBufRead, AsyncBufReadExt};

/// Most bytes kept of one log line (its kubelet timestamp included).
pub const LINE_CAP: usize = 1024 * 1024;

/// One line of the stream, without its newline.
#[derive(Debug, PartialEq, Eq)]
pub struct RawLine {
    pub bytes: Vec<u8>,
    /// The line was longer than the cap: `bytes` is its start, the rest is dropped.
    pub cut: bool,
}

/// Reads capped lines. Cancel-safe: every await is a `fill_buf`, which consumes nothing,
/// and what was taken from the stream lives in `self`, so a line read half-way when its
/// future is dropped (a `select!` with a timer) goes on where it was.
pub struct CappedLines<R> {
    inner: R,
    cap: usize,
    /// The line read so far.
    buf: Vec<u8>,
    /// Past the cap of the current line: drop bytes up to its newline.
    skipping: bool,
}

impl<R: AsyncBufRead + Unpin> CappedLines<R> {
    pub fn new(inner: R) -> Self {
        Self::with_cap(inner, LINE_CAP)
    }

    pub fn with_cap(inner: R, cap: usize) -> Self {
        CappedLines {
            inner,
            cap: cap.max(1),
            buf: Vec::new(),
            skipping: false,
        }
    }

    /// The next line; `None` at the end of the stream. A line cut at the cap is returned
    /// as soon as the cap is reached (the user sees it while the pod still prints it).
    /// A last line without a newline is returned at the end of the stream.
    pub async fn next_line(&mut self) -> Option<std::io::Result<RawLine>> {
        loop {
            let chunk = match self.inner.fill_buf().await {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            if chunk.is_empty() {
                self.skipping = false;
                if self.buf.is_empty() {
                    return None;
                }
                return Some(Ok(RawLine {
                    bytes: std::mem::take(&mut self.buf),
                    cut: false,
                }));
            }
            let newline = chunk.iter().position(|&b| b == b'\n');
            if self.skipping {
                match newline {
                    Some(at) => {
                        self.inner.consume_unpin(at + 1);
                        self.skipping = false;
                    }
                    None => {
                        let n = chunk.len();
                        self.inner.consume_unpin(n);
                    }
                }
                continue;
            }
            let room = self.cap - self.buf.len();
            match newline {
                Some(at) if at <= room => {
                    self.buf.extend_from_slice(&chunk[..at]);
                    self.inner.consume_unpin(at + 1);
                    return Some(Ok(RawLine {
                        bytes: std::mem::take(&mut self.buf),
                        cut: false,
                    }));
                }
                _ if chunk.len() < room => {
                    // No newline in this chunk and room for all of it.
                    self.buf.extend_from_slice(chunk);
                    let n = chunk.len();
                    self.inner.consume_unpin(n);
                }
                _ => {
                    // The cap is reached before this line's newline.
                    self.buf.extend_from_slice(&chunk[..room]);
                    self.inner.consume_unpin(room);
                    self.skipping = true;
                    return Some(Ok(RawLine {
                        bytes: std::mem::take(&mut self.buf),
                        cut: true,
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::io::Cursor;

    fn lines(input: &[u8], cap: usize) -> Vec<(String, bool)> {
        // A small BufReader capacity, so lines cross chunks.
        let r = futures_util::io::BufReader::with_capacity(3, Cursor::new(input.to_vec()));
        let mut l = CappedLines::with_cap(r, cap);
        let mut out = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            while let Some(line) = l.next_line().await {
                let line = line.expect("read");
                out.push((String::from_utf8_lossy(&line.bytes).into_owned(), line.cut));
            }
        });
        out
    }

    #[test]
    fn a_line_past_the_cap_is_cut_and_the_next_line_is_whole() {
        let got = lines(b"short\n0123456789abcdef\nnext\n", 8);
        assert_eq!(
            got,
            [
                ("short".to_string(), false),
                ("01234567".to_string(), true),
                ("next".to_string(), false)
            ]
        );
        // Exactly the cap is not cut; a last line without newline comes at the end.
        let got = lines(b"01234567\nend", 8);
        assert_eq!(
            got,
            [("01234567".to_string(), false), ("end".to_string(), false)]
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_do_not_end_the_stream() {
        let got = lines(b"before\n\xffbad\nafter\n", 64);
        assert_eq!(
            got,
            [
                ("before".to_string(), false),
                ("\u{fffd}bad".to_string(), false),
                ("after".to_string(), false)
            ]
        );
    }
}
