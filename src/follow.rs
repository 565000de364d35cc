//! Following a byte stream from its own framing: what lean's HTTP/1 responses
//! ([`crate::framing::Responses`]) and HTTP/2's frames ([`crate::h2::Frames`]) share.

/// Buffer reads a role takes to follow one read or write: a write with more steps than this (a
/// long run of small chunks or frames) is not followed further, and its stream is lost.
pub const MAX_READS: usize = 256;

/// A reader that looks at some bytes at its position, or passes over some unread.
pub trait Follower {
    /// What looking at bytes may find.
    type Found;

    /// How many bytes it wants to look at next, at most; `None`: it passes over bytes ([`Follower::skip`]).
    fn wants(&self) -> Option<usize>;

    /// Passes over up to `n` bytes unread; returns how many.
    fn skip(&mut self, n: usize) -> usize;

    /// Looks at bytes at its position, no more than it wants; returns how many it used.
    fn look(&mut self, bytes: &[u8]) -> (usize, Option<Self::Found>);

    /// The stream can no longer be followed.
    fn lose(&mut self);

    /// Follows bytes held in memory (a buffer read at the position followed so far, or a test's
    /// input); returns what was found in them. A step that moves nothing loses the stream.
    fn follow(&mut self, write: &[u8]) -> Vec<Self::Found> {
        let (mut pos, mut found) = (0, Vec::new());
        while pos < write.len() {
            let step = match self.wants() {
                None => self.skip(write.len().saturating_sub(pos)),
                Some(max) => {
                    let (used, seen) = self.look(&write[pos..pos.saturating_add(max).min(write.len())]);
                    found.extend(seen);
                    used
                }
            };
            if step == 0 {
                self.lose();
                break;
            }
            pos = pos.saturating_add(step);
        }
        found
    }
}
