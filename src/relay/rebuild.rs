//! Where the target relay rebuilds a region: frames from the source in, the exact bytes QEMU
//! on the target would have received out. Pure: the node's memory is reached through
//! [`RegionReader`], so every case (a region that changed since it was indexed, a process that
//! is gone, a resend) is tested without processes or sockets.
//!
//! A reference is rebuilt only if the region read now carries the source's verifier (a keyed
//! BLAKE3 over the whole region): the index may be stale, the verifier cannot be. Otherwise
//! the target asks for the pages, holds back everything after the reference until they
//! arrive, and so delivers the stream in order and byte for byte.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::relay::protocol::Frame;
use crate::relay::stream::{RefPart, RegionNamer, RegionRef};

/// Reads the region the node's index gives for an identity, as it is now.
pub trait RegionReader {
    fn read(&mut self, id: u64) -> Option<&[u8]>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Bytes for the target QEMU, in order.
    Write(Vec<u8>),
    /// Ask the source for the pages of reference `seq`.
    Resend(u64),
    /// Every reference before this count is delivered.
    Ack(u64),
    /// The source's QEMU closed its side; close ours once everything before is written.
    Close,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RebuildError {
    #[error("the source sent {0} in the middle of a stream")]
    Unexpected(&'static str),
    #[error("the source resent reference {got}, expected {want}")]
    WrongResend { got: u64, want: u64 },
    #[error("resent pages for reference {0} do not fit its parts")]
    BadPages(u64),
    #[error("more than {0} bytes held back waiting for a resend")]
    Backlog(usize),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildStats {
    pub references: u64,
    /// Rebuilt from this node's memory.
    pub rebuilt: u64,
    /// The region had changed, was gone or was never there: the source sent the pages.
    pub resent: u64,
    pub bytes_out: u64,
}

/// Frames held back while a resend is outstanding are bounded by the source's window; this is
/// the limit past which the connection is taken for broken.
const MAX_BACKLOG: usize = 512 << 20;

pub struct Rebuilder {
    namer: Arc<RegionNamer>,
    next_seq: u64,
    waiting: Option<(u64, Vec<RefPart>)>,
    held: VecDeque<Frame>,
    held_bytes: usize,
    pub stats: RebuildStats,
}

impl Rebuilder {
    pub fn new(namer: Arc<RegionNamer>) -> Self {
        Self {
            namer,
            next_seq: 0,
            waiting: None,
            held: VecDeque::new(),
            held_bytes: 0,
            stats: RebuildStats::default(),
        }
    }

    /// Whether a resend is outstanding.
    pub fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    pub fn push(
        &mut self,
        frame: Frame,
        reader: &mut dyn RegionReader,
        out: &mut Vec<Action>,
    ) -> Result<(), RebuildError> {
        let Some((want, _)) = &self.waiting else {
            return self.handle(frame, reader, out);
        };
        let want = *want;
        match frame {
            Frame::Resent { seq, pages } => {
                if seq != want {
                    return Err(RebuildError::WrongResend { got: seq, want });
                }
                let (_, parts) = self.waiting.take().expect("checked");
                let mut bytes = Vec::with_capacity(pages.len() + 64);
                if !RegionRef::expand_with_pages(&parts, &pages, &mut bytes) {
                    return Err(RebuildError::BadPages(seq));
                }
                self.write(bytes, out);
                out.push(Action::Ack(seq + 1));
                while self.waiting.is_none() {
                    let Some(next) = self.held.pop_front() else {
                        break;
                    };
                    self.held_bytes -= frame_bytes(&next);
                    self.handle(next, reader, out)?;
                }
                Ok(())
            }
            other => {
                self.held_bytes += frame_bytes(&other);
                if self.held_bytes > MAX_BACKLOG {
                    return Err(RebuildError::Backlog(MAX_BACKLOG));
                }
                self.held.push_back(other);
                Ok(())
            }
        }
    }

    fn handle(
        &mut self,
        frame: Frame,
        reader: &mut dyn RegionReader,
        out: &mut Vec<Action>,
    ) -> Result<(), RebuildError> {
        match frame {
            Frame::Data(bytes) => self.write(bytes, out),
            Frame::Ref {
                id,
                verifier,
                parts,
            } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.stats.references += 1;
                let region_bytes = self.namer.region_bytes();
                let rebuilt = reader.read(id).and_then(|region| {
                    if region.len() != region_bytes || self.namer.verifier(region) != verifier {
                        return None;
                    }
                    let mut bytes = Vec::with_capacity(region.len() + 256);
                    RegionRef::expand_with_region(&parts, region, &mut bytes).then_some(bytes)
                });
                match rebuilt {
                    Some(bytes) => {
                        self.stats.rebuilt += 1;
                        self.write(bytes, out);
                        out.push(Action::Ack(seq + 1));
                    }
                    None => {
                        self.stats.resent += 1;
                        out.push(Action::Resend(seq));
                        self.waiting = Some((seq, parts));
                    }
                }
            }
            Frame::End => out.push(Action::Close),
            Frame::Resent { .. } => {
                return Err(RebuildError::Unexpected("a resend nobody asked for"))
            }
            Frame::Hello { .. } => return Err(RebuildError::Unexpected("a second hello")),
            Frame::Filter { .. } | Frame::Ack { .. } | Frame::Resend { .. } => {
                return Err(RebuildError::Unexpected("a target-side frame"))
            }
            Frame::Reverse(_) | Frame::Refused(_) => {
                return Err(RebuildError::Unexpected("a target-side frame"))
            }
        }
        Ok(())
    }

    fn write(&mut self, bytes: Vec<u8>, out: &mut Vec<Action>) {
        self.stats.bytes_out += bytes.len() as u64;
        out.push(Action::Write(bytes));
    }
}

fn frame_bytes(f: &Frame) -> usize {
    match f {
        Frame::Data(b) => b.len(),
        Frame::Ref { parts, .. } => parts.iter().map(|p| p.literal.len() + 8).sum(),
        Frame::Resent { pages, .. } => pages.len(),
        _ => 16,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::plan::region::PAGE_SIZE;
    use crate::relay::stream::tests::{namer, page, region_content, HoldsSet, MainWriter};
    use crate::relay::stream::{Piece, SourceStream};

    /// A node's memory: regions by identity, which a test may change behind the index.
    struct Memory(HashMap<u64, Vec<u8>>);

    impl RegionReader for Memory {
        fn read(&mut self, id: u64) -> Option<&[u8]> {
            self.0.get(&id).map(|v| v.as_slice())
        }
    }

    fn stream_and_regions(regions: u64) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let n = namer();
        let mut w = MainWriter::new();
        w.ram_start(&[("pc.ram", regions * 16 * PAGE_SIZE as u64)]);
        w.ram_part();
        let mut held = Vec::new();
        for r in 0..regions {
            let pages: Vec<_> = (0..16).map(|i| (i, page(r * 16 + i as u64))).collect();
            for (i, p) in &pages {
                w.page("pc.ram", (r * 16 + *i as u64) * PAGE_SIZE as u64, p);
            }
            let content = region_content(&pages);
            held.push((n.identify(&content).unwrap(), content));
        }
        w.eos();
        w.devices_and_eof();
        (w.bytes, held)
    }

    fn frames_for(stream: &[u8], held: &HashSet<u64>) -> (Vec<Frame>, Vec<Vec<u8>>) {
        let mut s = SourceStream::new(namer());
        let holds = HoldsSet(held.clone());
        let mut pieces = s.push(stream, &holds);
        pieces.extend(s.finish());
        let mut frames = Vec::new();
        let mut kept = Vec::new();
        for p in pieces {
            match p {
                Piece::Literal(b) => frames.push(Frame::Data(b)),
                Piece::Ref(r) => {
                    frames.push(Frame::from_ref(&r));
                    kept.push(r.pages);
                }
            }
        }
        frames.push(Frame::End);
        (frames, kept)
    }

    /// Runs frames through a rebuilder, answering resends from the source's kept pages.
    fn deliver(
        frames: Vec<Frame>,
        kept: &[Vec<u8>],
        memory: &mut Memory,
    ) -> (Vec<u8>, RebuildStats, Vec<u64>) {
        let mut r = Rebuilder::new(namer());
        let mut out = Vec::new();
        let mut bytes = Vec::new();
        let mut resends = Vec::new();
        let mut queue: std::collections::VecDeque<Frame> = frames.into();
        while let Some(f) = queue.pop_front() {
            r.push(f, memory, &mut out).unwrap();
            for a in out.drain(..) {
                match a {
                    Action::Write(b) => bytes.extend_from_slice(&b),
                    Action::Resend(seq) => {
                        resends.push(seq);
                        // The answer arrives after frames the source already sent.
                        let at = queue.len().min(2);
                        queue.insert(
                            at,
                            Frame::Resent {
                                seq,
                                pages: kept[seq as usize].clone(),
                            },
                        );
                    }
                    Action::Ack(_) | Action::Close => {}
                }
            }
        }
        (bytes, r.stats, resends)
    }

    #[test]
    fn references_rebuild_the_exact_stream_from_memory() {
        let (stream, held) = stream_and_regions(6);
        let ids: HashSet<u64> = held.iter().map(|(id, _)| *id).collect();
        let (frames, kept) = frames_for(&stream, &ids);
        let mut memory = Memory(held.into_iter().collect());
        let (bytes, stats, resends) = deliver(frames, &kept, &mut memory);
        assert_eq!(bytes, stream);
        assert_eq!(stats.rebuilt, 6);
        assert_eq!(stats.resent, 0);
        assert!(resends.is_empty());
    }

    #[test]
    fn a_region_rewritten_since_it_was_indexed_is_resent_and_the_stream_stays_exact() {
        let (stream, held) = stream_and_regions(6);
        let ids: HashSet<u64> = held.iter().map(|(id, _)| *id).collect();
        let (frames, kept) = frames_for(&stream, &ids);
        let mut memory = Memory(held.iter().cloned().collect());
        // Region 2 changed in the store's process after the scan; region 4's process is gone.
        memory.0.get_mut(&held[2].0).unwrap()[5000] ^= 0xff;
        memory.0.remove(&held[4].0);
        let (bytes, stats, resends) = deliver(frames, &kept, &mut memory);
        assert_eq!(bytes, stream);
        assert_eq!(stats.rebuilt, 4);
        assert_eq!(stats.resent, 2);
        assert_eq!(resends, vec![2, 4]);
    }

    #[test]
    fn nothing_after_a_missing_region_is_delivered_before_its_pages() {
        let (stream, held) = stream_and_regions(2);
        let ids: HashSet<u64> = held.iter().map(|(id, _)| *id).collect();
        let (frames, _) = frames_for(&stream, &ids);
        let mut memory = Memory(HashMap::new());
        let mut r = Rebuilder::new(namer());
        let mut out = Vec::new();
        let mut written = 0;
        for f in frames {
            r.push(f, &mut memory, &mut out).unwrap();
        }
        for a in &out {
            if let Action::Write(b) = a {
                written += b.len();
            }
        }
        assert!(r.waiting());
        assert!(out.contains(&Action::Resend(0)));
        assert!(!out.contains(&Action::Close), "held back until the resend");
        assert!(written < stream.len() - 2 * 16 * PAGE_SIZE);
    }

    #[test]
    fn a_resend_for_the_wrong_reference_or_with_wrong_pages_is_an_error() {
        let (stream, held) = stream_and_regions(1);
        let ids: HashSet<u64> = held.iter().map(|(id, _)| *id).collect();
        let (frames, _) = frames_for(&stream, &ids);
        let mut memory = Memory(HashMap::new());
        let mut r = Rebuilder::new(namer());
        let mut out = Vec::new();
        for f in frames {
            r.push(f, &mut memory, &mut out).unwrap();
        }
        assert_eq!(
            r.push(
                Frame::Resent {
                    seq: 7,
                    pages: vec![]
                },
                &mut memory,
                &mut out
            ),
            Err(RebuildError::WrongResend { got: 7, want: 0 })
        );
        assert_eq!(
            r.push(
                Frame::Resent {
                    seq: 0,
                    pages: vec![0; 10]
                },
                &mut memory,
                &mut out
            ),
            Err(RebuildError::BadPages(0))
        );
        let mut fresh = Rebuilder::new(namer());
        assert!(fresh
            .push(Frame::Ack { upto: 1 }, &mut memory, &mut out)
            .is_err());
    }
}
