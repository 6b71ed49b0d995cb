//! Line framing: turns the byte stream of one connection into request lines.
//!
//! Lines end with `\n`; a `\r` before it is dropped and empty lines are skipped. A line longer
//! than the limit yields one `TooLong` and the rest of it is discarded up to its `\n`.

/// One framed unit of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Line(Vec<u8>),
    TooLong,
}

impl Frame {
    /// Bytes the frame holds (what it costs in a connection's inbox).
    pub fn bytes_held(&self) -> usize {
        match self {
            Frame::Line(line) => line.len(),
            Frame::TooLong => 0,
        }
    }
}

/// Accumulates bytes across reads and cuts them into frames.
#[derive(Debug)]
pub struct LineFramer {
    partial: Vec<u8>,
    discarding: bool,
    max_line: usize,
}

impl LineFramer {
    pub fn new(max_line: usize) -> LineFramer {
        LineFramer {
            partial: Vec::new(),
            discarding: false,
            max_line,
        }
    }

    /// Feeds newly read bytes; complete frames are pushed onto `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut impl Extend<Frame>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.take_piece(&bytes[..end], out);
                    self.finish_line(out);
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.take_piece(bytes, out);
                    bytes = &[];
                }
            }
        }
    }

    fn take_piece(&mut self, piece: &[u8], out: &mut impl Extend<Frame>) {
        if self.discarding {
            return;
        }
        // One byte of slack lets a `\r` before `\n` through on a line of exactly max_line bytes.
        if self.partial.len() + piece.len() > self.max_line + 1 {
            self.partial.clear();
            self.discarding = true;
            out.extend(Some(Frame::TooLong));
            return;
        }
        self.partial.extend_from_slice(piece);
    }

    fn finish_line(&mut self, out: &mut impl Extend<Frame>) {
        if std::mem::take(&mut self.discarding) {
            return;
        }
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > self.max_line {
            out.extend(Some(Frame::TooLong));
        } else if !line.is_empty() {
            out.extend(Some(Frame::Line(line)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut framer = LineFramer::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            framer.feed(chunk, &mut out);
        }
        out
    }

    fn line(text: &str) -> Frame {
        Frame::Line(text.as_bytes().to_vec())
    }

    #[test]
    fn splits_many_lines_in_one_read() {
        assert_eq!(
            frames(100, &[b"a\nbb\r\n\n\r\nccc\n"]),
            vec![line("a"), line("bb"), line("ccc")]
        );
    }

    #[test]
    fn joins_a_line_across_reads() {
        assert_eq!(
            frames(100, &[b"he", b"ll", b"o\r", b"\nx"]),
            vec![line("hello")]
        );
    }

    #[test]
    fn long_line_is_reported_once_and_the_rest_discarded() {
        let long = vec![b'x'; 25];
        let got = frames(10, &[&long, &long, b"tail\nok\n"]);
        assert_eq!(got, vec![Frame::TooLong, line("ok")]);
    }

    #[test]
    fn exact_limit_is_accepted_with_or_without_cr() {
        assert_eq!(frames(3, &[b"abc\n"]), vec![line("abc")]);
        assert_eq!(frames(3, &[b"abc\r\n"]), vec![line("abc")]);
        assert_eq!(frames(3, &[b"abcd\n"]), vec![Frame::TooLong]);
        assert_eq!(frames(3, &[b"abcde\n"]), vec![Frame::TooLong]);
    }
}
