//! Room pages: the broadcast lines of a room, written one after another into shared buffers,
//! so that a connection's run of consecutive room lines is one outbox entry and one slice of a
//! `writev`, however many lines it holds.
//!
//! Why: at full speed a loop queues each connection several lines of its room per turn. One
//! outbox entry per line (a reference-counted buffer each) cost a cold cache line per delivery
//! to queue and another to write (`perf`: 18% of the server's time in `push` and `flush`), and
//! gave the kernel one small segment per line to copy. On a page, a line that follows the last
//! one a connection has queued (same page, next seq) only moves that entry's end.
//!
//! A page is append-only: bytes below its length are never written again, so handing out
//! shared slices of them while later lines are appended is sound (see the `unsafe` blocks).
//! Pages live as long as a queued run or the room's current page refers to them (`Weak`), so
//! an idle room holds no buffer.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::rc::{Rc, Weak};

/// Bytes a new page can hold (a longer line gets a page of its own size).
pub const PAGE_BYTES: usize = 32 * 1024;

/// An append-only byte buffer shared by the runs that refer to it.
pub struct Page {
    /// Start of an allocation of `capacity` bytes (a `Vec<u8>`'s, taken apart).
    base: *mut u8,
    capacity: usize,
    /// Bytes written so far; they never change again.
    len: Cell<usize>,
}

impl Page {
    fn with_capacity(capacity: usize) -> Page {
        let mut buffer = ManuallyDrop::new(Vec::<u8>::with_capacity(capacity));
        Page {
            base: buffer.as_mut_ptr(),
            capacity: buffer.capacity(),
            len: Cell::new(0),
        }
    }

    /// Appends `bytes` if they fit; returns where they start.
    fn append(&self, bytes: &[u8]) -> Option<usize> {
        let start = self.len.get();
        if self.capacity - start < bytes.len() {
            return None;
        }
        // SAFETY: `start + bytes.len() <= capacity`, so the destination lies inside the
        // allocation; bytes at and after `len` are not covered by any slice handed out (those
        // end at or below `len`), so nothing aliases what is written.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(start), bytes.len()) };
        self.len.set(start + bytes.len());
        Some(start)
    }

    /// Bytes `start..end`, which must already be written.
    fn slice(&self, start: usize, end: usize) -> &[u8] {
        assert!(
            start <= end && end <= self.len.get(),
            "page slice past its length"
        );
        // SAFETY: `start..end` is initialised (below `len`) and is never written again
        // (`append` only writes at and after `len`).
        unsafe { std::slice::from_raw_parts(self.base.add(start), end - start) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: `base` and `capacity` came from a `Vec<u8>` that was never freed; length 0,
        // since `u8` needs no drop.
        drop(unsafe { Vec::from_raw_parts(self.base, 0, self.capacity) });
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("len", &self.len.get())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Whole lines `start..end` of a page.
#[derive(Debug, Clone)]
pub struct Run {
    page: Rc<Page>,
    start: usize,
    end: usize,
}

impl Run {
    pub fn bytes(&self) -> &[u8] {
        self.page.slice(self.start, self.end)
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Takes in `next` when it continues this run on the same page; true when it did.
    pub fn extend(&mut self, next: &Run) -> bool {
        if self.end != next.start || !Rc::ptr_eq(&self.page, &next.page) {
            return false;
        }
        self.end = next.end;
        true
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.end = self.start + len.min(self.len());
    }
}

/// The page a room's next line goes on.
#[derive(Debug, Default)]
pub struct RoomPage {
    current: Weak<Page>,
}

impl RoomPage {
    /// Puts `line` on the room's page (a new one when the current is full or gone).
    pub fn share(&mut self, line: &[u8]) -> Run {
        if let Some(page) = self.current.upgrade() {
            if let Some(start) = page.append(line) {
                return Run {
                    page,
                    start,
                    end: start + line.len(),
                };
            }
        }
        let page = Rc::new(Page::with_capacity(line.len().max(PAGE_BYTES)));
        let start = page.append(line).unwrap_or(0);
        self.current = Rc::downgrade(&page);
        Run {
            page,
            start,
            end: start + line.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_lines_make_one_run() {
        let mut room = RoomPage::default();
        let mut run = room.share(b"one\n");
        let two = room.share(b"two\n");
        assert!(run.extend(&two));
        assert_eq!(run.bytes(), b"one\ntwo\n");
        // A line already taken in does not extend it again.
        assert!(!run.extend(&two));
    }

    #[test]
    fn a_full_page_starts_another_and_runs_do_not_cross() {
        let mut room = RoomPage::default();
        let big = vec![b'x'; PAGE_BYTES - 2];
        let mut first = room.share(&big);
        let next = room.share(b"abc\n");
        assert!(!first.extend(&next), "a new page, not contiguous");
        assert_eq!(next.bytes(), b"abc\n");
        assert_eq!(first.bytes().len(), PAGE_BYTES - 2);
    }

    #[test]
    fn a_line_longer_than_a_page_gets_its_own() {
        let mut room = RoomPage::default();
        let huge = vec![b'y'; PAGE_BYTES * 3];
        assert_eq!(room.share(&huge).bytes(), &huge[..]);
    }

    #[test]
    fn an_idle_room_holds_no_page() {
        let mut room = RoomPage::default();
        let run = room.share(b"hello\n");
        assert!(room.current.upgrade().is_some());
        drop(run);
        assert!(
            room.current.upgrade().is_none(),
            "written runs free the page"
        );
        assert_eq!(room.share(b"again\n").bytes(), b"again\n");
    }

    #[test]
    fn truncate_keeps_a_prefix() {
        let mut room = RoomPage::default();
        let mut run = room.share(b"one\n");
        assert!(run.extend(&room.share(b"two\n")));
        run.truncate(4);
        assert_eq!(run.bytes(), b"one\n");
        assert!(!run.is_empty());
    }
}
