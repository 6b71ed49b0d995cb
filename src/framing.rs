//! Line framing: turns the byte stream of one connection into request lines.
//!
//! Lines end with `\n`; a `\r` before it is dropped and empty lines are skipped. A line longer
//! than the limit yields one `TooLong` and the rest of it is discarded up to its `\n`.
//!
//! People type at this server with `telnet` too, which sends option negotiation (RFC 854: IAC
//! = 0xFF, then a command) and, on Ctrl-C and the like, waits for an answer: without one the
//! session freezes. 0xFF never occurs in UTF-8 or JSON, so every IAC sequence is taken out of
//! the stream, and answered through `take_telnet_answers`: offers are refused (`DO x` → `WONT
//! x`, `WILL x` → `DONT x`) except BINARY (8-bit input, which the server asks for) and
//! TIMING-MARK (`WILL`, as RFC 860 asks).
//!
//! Non-English text: a BSD-derived telnet (Debian's inetutils and netkit clients) not in
//! BINARY mode compares the *low seven bits* of every typed byte with its special characters,
//! so UTF-8 continuation bytes 0x83, 0x8F, 0x9A and 0x9C (Ctrl-C, Ctrl-O, Ctrl-Z and Ctrl-\
//! with the top bit set; e.g. in ✓, 本, σ, я, Ü) leave as `IAC IP`, `IAC AO`, `IAC SUSP`,
//! `IAC BRK`/`IAC ABORT`, each maybe followed by `IAC DO TIMING-MARK`. Such a command in the
//! middle of a UTF-8 sequence can only be that substitution, so the byte it replaced is put
//! back. And the first IAC a client sends proves it speaks telnet: the server then asks it
//! for BINARY (`IAC DO BINARY`), after which it sends every byte as typed. 0x85 (its echo
//! toggle) and 0x9D (its escape character) never leave a client before that; the line then
//! fails UTF-8 validation with an error that says how to start telnet (`-8 -E`). Clients that
//! never send IAC (`nc`, programs) are never sent one, and their bytes are never changed.
//!
//! Who speaks telnet: a connection does once it sent a real telnet command (IAC and a command
//! byte, 236-254) where a telnet client sends one: at the start of a line (negotiation,
//! Ctrl-C), or inside a UTF-8 sequence (the substitution above). Until then a 0xFF elsewhere
//! (a program's stray byte in a JSON string, or IAC followed by a byte that is no command) is
//! kept as data: the line is then invalid UTF-8 and refused (`bad_json`), never silently
//! changed, and the client is never sent telnet bytes.
//!
//! Answers are bounded: a refusal is sent once per option (a client that asks again was
//! already told; RFC 1143 loops are avoided the same way), so only TIMING-MARK confirmations
//! repeat, and the connection drops answers while it holds a reply backlog (`connection.rs`).

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

const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;
const TELOPT_BINARY: u8 = 0;
const TELOPT_TIMING_MARK: u8 = 6;

/// The byte a BSD telnet not in BINARY mode replaced with this command: its special character
/// with the top bit set (default `stty` characters: intr ^C, quit ^\, susp ^Z, discard ^O,
/// eof ^D, kill ^U).
fn replaced_byte(command: u8) -> Option<u8> {
    match command {
        244 => Some(0x83),       // IP: ^C
        243 | 238 => Some(0x9C), // BRK (its "kludge" line mode) or ABORT: ^\
        237 => Some(0x9A),       // SUSP: ^Z
        245 => Some(0x8F),       // AO: ^O
        236 => Some(0x84),       // EOF: ^D (LINEMODE only)
        248 => Some(0x95),       // EL: ^U
        _ => None,
    }
}

/// Continuation bytes still due after `bytes`, given `before` were due at its start.
fn utf8_due_after(bytes: &[u8], before: u8) -> u8 {
    let mut due = before;
    for &byte in bytes {
        due = match byte {
            0x80..=0xBF => due.saturating_sub(1),
            0xC0..=0xDF => 1,
            0xE0..=0xEF => 2,
            0xF0..=0xF7 => 3,
            _ => 0,
        };
    }
    due
}

/// Whether `byte` after IAC is a telnet command (RFC 854: EOF 236 to DONT 254).
fn is_command(byte: u8) -> bool {
    (236..=254).contains(&byte)
}

/// A set of telnet options (one bit each).
#[derive(Debug, Default, Clone, Copy)]
struct OptionSet([u64; 4]);

impl OptionSet {
    /// Adds `option`; true when it was not in the set yet.
    fn insert(&mut self, option: u8) -> bool {
        let (word, bit) = (usize::from(option / 64), 1u64 << (option % 64));
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }
}

/// Where the framer is inside a telnet command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Telnet {
    Data,
    /// After IAC.
    Command,
    /// After an IAC from a connection not known to speak telnet yet: a command byte next
    /// makes it one; anything else makes the 0xFF data.
    Tentative,
    /// After IAC and WILL/WONT/DO/DONT: the option byte comes next.
    Option(u8),
    /// Inside a subnegotiation (IAC SB ... IAC SE), with the bytes seen so far.
    Sub(usize),
    /// After IAC inside a subnegotiation.
    SubCommand(usize),
}

/// Longest subnegotiation accepted; real ones (window size, terminal type) are a few bytes. A
/// stray `IAC SB` in garbage must not make the connection deaf: past this, or at a newline,
/// the framer is back to plain data.
const MAX_SUBNEGOTIATION: usize = 64;

/// Calls `each` with every complete line at the start of `buffer` (without its `\n`, and
/// without a `\r` before it), in place; returns how many bytes those lines took. For readers
/// that trust their peer and keep their own buffer (the load generator reading the server's
/// replies): no limit, no telnet, no copy. `LineFramer` is the server's guarded version.
pub fn split_lines(buffer: &[u8], mut each: impl FnMut(&[u8])) -> usize {
    let mut start = 0;
    while let Some(end) = memchr::memchr(b'\n', &buffer[start..]) {
        let line = &buffer[start..start + end];
        each(line.strip_suffix(b"\r").unwrap_or(line));
        start += end + 1;
    }
    start
}

/// Accumulates bytes across reads and cuts them into frames.
#[derive(Debug)]
pub struct LineFramer {
    partial: Vec<u8>,
    discarding: bool,
    max_line: usize,
    telnet: Telnet,
    answers: Vec<u8>,
    /// The client has sent a telnet command (so it may be sent some).
    speaks_telnet: bool,
    /// UTF-8 continuation bytes the data so far still owes (a command arriving while some
    /// are due stands for one of them, see the module doc).
    utf8_due: u8,
    /// The line being read has data already (an IAC there is data until telnet is proven).
    line_started: bool,
    /// Options already refused (`DO x` answered `WONT x`, `WILL x` answered `DONT x`).
    refused_do: OptionSet,
    refused_will: OptionSet,
}

impl LineFramer {
    pub fn new(max_line: usize) -> LineFramer {
        LineFramer {
            partial: Vec::new(),
            discarding: false,
            max_line,
            telnet: Telnet::Data,
            answers: Vec::new(),
            speaks_telnet: false,
            utf8_due: 0,
            line_started: false,
            refused_do: OptionSet::default(),
            refused_will: OptionSet::default(),
        }
    }

    /// Whether the client has proven to speak telnet (see the module doc).
    pub fn speaks_telnet(&self) -> bool {
        self.speaks_telnet
    }

    /// Bytes to send back for the telnet negotiation seen so far (refusals), if any.
    pub fn take_telnet_answers(&mut self) -> Option<Vec<u8>> {
        (!self.answers.is_empty()).then(|| std::mem::take(&mut self.answers))
    }

    /// Feeds newly read bytes; complete frames are pushed onto `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut impl Extend<Frame>) {
        if self.telnet == Telnet::Data && !bytes.contains(&IAC) {
            self.utf8_due = utf8_due_after(bytes, self.utf8_due);
            self.line_started = match memchr::memrchr(b'\n', bytes) {
                Some(end) => end + 1 < bytes.len(),
                None => self.line_started || !bytes.is_empty(),
            };
            return self.feed_data(bytes, out);
        }
        let mut data = Vec::with_capacity(bytes.len());
        for &byte in bytes {
            self.telnet = match (self.telnet, byte) {
                // Not a telnet command after all: the 0xFF is data (and so is this byte).
                (Telnet::Tentative, _) if !is_command(byte) => {
                    data.push(IAC);
                    self.take_data(byte, &mut data);
                    Telnet::Data
                }
                // A newline always ends a line: no telnet command spans one.
                (_, b'\n') => {
                    data.push(byte);
                    self.utf8_due = 0;
                    self.line_started = false;
                    Telnet::Data
                }
                (Telnet::Data, IAC) if self.speaks_telnet => Telnet::Command,
                // Where a telnet client sends a command, it may be one: wait for the next byte.
                (Telnet::Data, IAC) if !self.line_started || self.utf8_due > 0 => Telnet::Tentative,
                (Telnet::Data, _) => {
                    self.take_data(byte, &mut data);
                    Telnet::Data
                }
                (Telnet::Tentative, _) => {
                    self.speaks_telnet = true;
                    // Ask for 8-bit input: from now on nothing typed is mangled.
                    self.answers.extend_from_slice(&[IAC, DO, TELOPT_BINARY]);
                    self.command(byte, &mut data)
                }
                (Telnet::Command, _) => self.command(byte, &mut data),
                (Telnet::Option(command), option) => {
                    self.answer_option(command, option);
                    Telnet::Data
                }
                (Telnet::Sub(n) | Telnet::SubCommand(n), _) if n >= MAX_SUBNEGOTIATION => {
                    Telnet::Data
                }
                (Telnet::Sub(n), IAC) => Telnet::SubCommand(n + 1),
                (Telnet::Sub(n), _) => Telnet::Sub(n + 1),
                (Telnet::SubCommand(_), SE) => Telnet::Data,
                (Telnet::SubCommand(n), _) => Telnet::Sub(n + 1),
            };
        }
        self.feed_data(&data, out);
    }

    /// A data byte of the line being read.
    fn take_data(&mut self, byte: u8, data: &mut Vec<u8>) {
        data.push(byte);
        self.utf8_due = utf8_due_after(&[byte], self.utf8_due);
        self.line_started = byte != b'\n';
    }

    /// The byte after IAC from a client that speaks telnet; returns the state after it.
    fn command(&mut self, byte: u8, data: &mut Vec<u8>) -> Telnet {
        match byte {
            WILL | WONT | DO | DONT => Telnet::Option(byte),
            SB => Telnet::Sub(0),
            // Inside a UTF-8 sequence a special-character command is the byte it replaced.
            command if self.utf8_due > 0 => {
                if let Some(replaced) = replaced_byte(command) {
                    data.push(replaced);
                    self.utf8_due -= 1;
                }
                Telnet::Data
            }
            // IAC IAC is a literal 0xFF: not valid in a JSON line, so it stays out too.
            _ => Telnet::Data,
        }
    }

    /// Answers one option request: the client's 8-bit input is wanted (`WILL BINARY`, asked
    /// for by the server), TIMING-MARK is confirmed (RFC 860: the client waits for it before
    /// showing output again), everything else is refused, our own BINARY output too (a
    /// client receiving in binary mode stops turning "\n" into a new line on the terminal,
    /// and UTF-8 output displays fine without it).
    fn answer_option(&mut self, command: u8, option: u8) {
        let answer = match (command, option) {
            // Our own `DO BINARY` is being agreed to: no answer (RFC 854 option rules).
            (WILL, TELOPT_BINARY) => None,
            (DO, TELOPT_TIMING_MARK) => Some(WILL),
            (DO, _) if self.refused_do.insert(option) => Some(WONT),
            (WILL, _) if self.refused_will.insert(option) => Some(DONT),
            _ => None,
        };
        if let Some(answer) = answer {
            self.answers.extend_from_slice(&[IAC, answer, option]);
        }
    }

    fn feed_data(&mut self, mut bytes: &[u8], out: &mut impl Extend<Frame>) {
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

    #[test]
    fn split_lines_leaves_the_partial_tail() {
        let mut lines = Vec::new();
        let used = split_lines(b"one\r\ntwo\n\nthr", |line| lines.push(line.to_vec()));
        assert_eq!(lines, [b"one".to_vec(), b"two".to_vec(), Vec::new()]);
        assert_eq!(used, 10);
    }

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
    fn telnet_negotiation_is_taken_out_and_refused() {
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        // DO ECHO, WILL SUPPRESS-GO-AHEAD, a subnegotiation, then a line with IAC IP inside.
        framer.feed(
            &[IAC, DO, 1, IAC, WILL, 3, IAC, SB, 24, 1, IAC, SE],
            &mut out,
        );
        framer.feed(b"{\"a\":", &mut out);
        framer.feed(&[IAC, 244, b'1', b'}', b'\r', b'\n'], &mut out);
        assert_eq!(out, vec![line("{\"a\":1}")]);
        assert_eq!(
            framer.take_telnet_answers(),
            Some(vec![IAC, DO, 0, IAC, WONT, 1, IAC, DONT, 3])
        );
        assert_eq!(framer.take_telnet_answers(), None);
    }

    #[test]
    fn a_special_character_command_inside_utf8_is_the_byte_it_replaced() {
        // What a 7-bit telnet sends for "✓ Ü σ я 本 њ": each 0x9C/0x83/0x8F/0x9A became a
        // command, some followed by IAC DO TIMING-MARK.
        let mut sent = Vec::new();
        sent.extend_from_slice(&[0xE2, IAC, 243, IAC, DO, 6, 0x93, b' ']); // ✓ E2 9C 93
        sent.extend_from_slice(&[0xC3, IAC, 238, b' ']); // Ü C3 9C
        sent.extend_from_slice(&[0xCF, IAC, 244, IAC, DO, 6, b' ']); // σ CF 83
        sent.extend_from_slice(&[0xD1, IAC, 245, b' ']); // я D1 8F
        sent.extend(b"\xE6\x9C\xAC"); // 本, typed once BINARY holds
        sent.extend_from_slice(&[b' ', 0xD1, IAC, 237, b'\r', b'\n']); // њ D1 9A
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        // Split anywhere: the state carries across reads.
        for chunk in sent.chunks(3) {
            framer.feed(chunk, &mut out);
        }
        assert_eq!(out, vec![line("✓ Ü σ я 本 њ")]);
        assert_eq!(
            framer.take_telnet_answers(),
            Some(vec![IAC, DO, 0, IAC, WILL, 6, IAC, WILL, 6])
        );
        // The client agreeing to BINARY gets no answer; an IP outside UTF-8 is dropped.
        framer.feed(&[IAC, WILL, 0, b'a', IAC, 244, b'b', b'\n'], &mut out);
        assert_eq!(out.last(), Some(&line("ab")));
        assert_eq!(framer.take_telnet_answers(), None);
    }

    #[test]
    fn bytes_from_clients_that_never_send_iac_are_untouched() {
        let text = "✓ Ü σ я 本 Њ \u{1F642}".as_bytes();
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        framer.feed(text, &mut out);
        framer.feed(&[0xC3, b'x', b'\n'], &mut out);
        let mut expected = text.to_vec();
        expected.extend_from_slice(&[0xC3, b'x']);
        assert_eq!(out, vec![Frame::Line(expected)]);
        assert_eq!(
            framer.take_telnet_answers(),
            None,
            "nothing is ever sent to them"
        );
    }

    #[test]
    fn garbage_telnet_commands_never_swallow_the_next_line() {
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        // A telnet client (it negotiated first), then garbage commands.
        framer.feed(&[IAC, WILL, TELOPT_BINARY], &mut out);
        framer.feed(&[b'x', IAC, SB, b'y', b'\n'], &mut out);
        framer.feed(b"ping\n", &mut out);
        framer.feed(&[IAC, DO, b'\n', b'a', b'\n'], &mut out);
        framer.feed(&[IAC, SB], &mut out);
        framer.feed(&[b'z'; 100], &mut out);
        framer.feed(b"\nok\n", &mut out);
        // Past 64 bytes a subnegotiation is given up: the rest of that line is data.
        let rest = "z".repeat(35);
        assert_eq!(
            out,
            vec![line("x"), line("ping"), line("a"), line(&rest), line("ok")]
        );
    }

    #[test]
    fn a_stray_0xff_from_a_program_is_kept_and_nothing_is_answered() {
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        // IAC then a byte that is no command, mid-line and at a line start; IAC IP mid-line
        // outside UTF-8 (no telnet client sends that before negotiating).
        framer.feed(b"{\"text\":\"pay 1\xff000 now\"}\n", &mut out);
        framer.feed(b"\xff{\"event\":\"ping\"}\n", &mut out);
        framer.feed(&[b'a', IAC], &mut out);
        framer.feed(&[244, b'1', b'\n'], &mut out);
        assert_eq!(
            out,
            vec![
                Frame::Line(b"{\"text\":\"pay 1\xff000 now\"}".to_vec()),
                Frame::Line(b"\xff{\"event\":\"ping\"}".to_vec()),
                Frame::Line(vec![b'a', IAC, 244, b'1']),
            ]
        );
        assert_eq!(framer.take_telnet_answers(), None);
        assert!(!framer.speaks_telnet());
    }

    #[test]
    fn refusals_are_sent_once_per_option() {
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        let mut storm = Vec::new();
        for _ in 0..1000 {
            storm.extend_from_slice(&[IAC, DO, 1, IAC, WILL, 3]);
        }
        framer.feed(&storm, &mut out);
        assert_eq!(
            framer.take_telnet_answers(),
            Some(vec![IAC, DO, 0, IAC, WONT, 1, IAC, DONT, 3])
        );
        framer.feed(&storm, &mut out);
        assert_eq!(framer.take_telnet_answers(), None);
        assert!(out.is_empty());
    }

    #[test]
    fn exact_limit_is_accepted_with_or_without_cr() {
        assert_eq!(frames(3, &[b"abc\n"]), vec![line("abc")]);
        assert_eq!(frames(3, &[b"abc\r\n"]), vec![line("abc")]);
        assert_eq!(frames(3, &[b"abcd\n"]), vec![Frame::TooLong]);
        assert_eq!(frames(3, &[b"abcde\n"]), vec![Frame::TooLong]);
    }
}
