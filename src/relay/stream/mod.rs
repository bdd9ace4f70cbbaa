//! QEMU's migration stream as the source relay sees it: bytes in, pieces out. A piece is either
//! literal bytes to forward or a reference to one memory region the target node already holds.
//! Nothing here does I/O, so captured streams replay in unit tests.
//!
//! The first bytes of a connection decide how it is read: QEMU's file magic starts the main
//! channel ([`main_channel`]), the multifd magic a multifd channel ([`multifd`]); anything else
//! is forwarded byte for byte. A parser that meets something it does not know (a stream
//! version, a RAM flag such as compression or XBZRLE, an odd packet) forwards the rest of that
//! connection byte for byte and records why: the output is always exactly the input, with
//! whole matched regions replaced by references.

pub mod cursor;
pub mod fixtures;
pub mod main_channel;
pub mod multifd;
pub mod region_run;

use std::sync::Arc;

use crate::plan::region::{digest_region, ClusterKey, RegionContent, PAGE_SIZE};

pub use region_run::RegionRun;

/// Does the target node hold content with this identity? The answer may be stale or wrong:
/// the target verifies every reference and asks for the bytes when it cannot rebuild it.
pub trait Holds {
    fn holds(&self, id: u64) -> bool;
}

/// Holds nothing: every region goes as bytes.
pub struct HoldsNothing;

impl Holds for HoldsNothing {
    fn holds(&self, _: u64) -> bool {
        false
    }
}

/// Names a region's content twice: the identity the target's store is indexed by (the same
/// keyed identity the agents publish), and a keyed cryptographic verifier over the bytes with
/// which the target proves the region it rebuilt is the source's.
pub struct RegionNamer {
    key: ClusterKey,
    verifier_key: [u8; 32],
    pages_per_region: usize,
    zero_region: crate::plan::region::ContentDigest,
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl RegionNamer {
    pub fn new(key: ClusterKey, pages_per_region: u32) -> Self {
        let verifier_key = key.derive_key("commonground relay region verifier v1");
        let zero_region = crate::plan::region::ContentDigest(xxhash_rust::xxh3::xxh3_128(&vec![
                0u8;
                pages_per_region
                    as usize
                    * PAGE_SIZE
            ]));
        Self {
            key,
            verifier_key,
            pages_per_region: pages_per_region as usize,
            zero_region,
        }
    }

    pub fn pages_per_region(&self) -> usize {
        self.pages_per_region
    }

    pub fn region_bytes(&self) -> usize {
        self.pages_per_region * PAGE_SIZE
    }

    pub fn key_id(&self) -> &str {
        &self.key.key_id
    }

    /// The identity of a region's bytes; `None` for an all-zero region (never referenced).
    pub fn identify(&self, content: &[u8]) -> Option<u64> {
        match digest_region(content) {
            RegionContent::Zero => None,
            RegionContent::Data(d) => Some(self.key.identify(d).0),
        }
    }

    pub fn identify_digest(&self, digest: crate::plan::region::ContentDigest) -> u64 {
        self.key.identify(digest).0
    }

    pub fn verifier(&self, content: &[u8]) -> [u8; 16] {
        let h = blake3::keyed_hash(&self.verifier_key, content);
        h.as_bytes()[..16].try_into().expect("16 of 32 bytes")
    }

    /// [`RegionNamer::identify`] of a region given page by page (`None` for a zero page),
    /// without assembling it: the same identity as of the assembled bytes.
    pub fn identify_pages<'a>(&self, pages: impl Iterator<Item = Option<&'a [u8]>>) -> Option<u64> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for p in pages {
            h.update(p.unwrap_or(&ZERO_PAGE));
        }
        let d = crate::plan::region::ContentDigest(h.digest128());
        if d == self.zero_region {
            return None;
        }
        Some(self.key.identify(d).0)
    }

    /// [`RegionNamer::verifier`] of a region given page by page.
    pub fn verifier_pages<'a>(&self, pages: impl Iterator<Item = Option<&'a [u8]>>) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.verifier_key);
        for p in pages {
            h.update(p.unwrap_or(&ZERO_PAGE));
        }
        h.finalize().as_bytes()[..16]
            .try_into()
            .expect("16 of 32 bytes")
    }
}

/// One memory region the source replaces by a reference: how to rebuild exactly the bytes it
/// stands for from the region's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRef {
    pub id: u64,
    pub verifier: [u8; 16],
    /// In stream order: literal bytes, then (optionally) one page of the region.
    pub parts: Vec<RefPart>,
    /// The pages the parts name, concatenated in part order: kept by the source until the
    /// target acknowledges the reference, and sent if the target cannot rebuild it.
    pub pages: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefPart {
    pub literal: Vec<u8>,
    pub page: Option<u16>,
}

impl RegionRef {
    /// The bytes of QEMU's stream this reference stands for.
    pub fn original_len(&self) -> usize {
        self.parts.iter().map(|p| p.literal.len()).sum::<usize>() + self.pages.len()
    }

    /// Rebuilds the original bytes from the pages in part order (the source's own `pages`, or
    /// pages a target resent).
    pub fn expand_with_pages(parts: &[RefPart], pages: &[u8], out: &mut Vec<u8>) -> bool {
        let mut next = 0usize;
        for part in parts {
            out.extend_from_slice(&part.literal);
            if part.page.is_some() {
                let Some(page) = pages.get(next..next + PAGE_SIZE) else {
                    return false;
                };
                out.extend_from_slice(page);
                next += PAGE_SIZE;
            }
        }
        next == pages.len()
    }

    /// Rebuilds the original bytes from the region's whole content.
    pub fn expand_with_region(parts: &[RefPart], region: &[u8], out: &mut Vec<u8>) -> bool {
        for part in parts {
            out.extend_from_slice(&part.literal);
            if let Some(i) = part.page {
                let at = i as usize * PAGE_SIZE;
                let Some(page) = region.get(at..at + PAGE_SIZE) else {
                    return false;
                };
                out.extend_from_slice(page);
            }
        }
        true
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Literal(Vec<u8>),
    Ref(RegionRef),
}

/// Collects pieces, merging neighbouring literal bytes into one piece.
#[derive(Default)]
pub struct Output {
    pieces: Vec<Piece>,
    literal: Vec<u8>,
}

/// Literal pieces are cut at this size so frames stay small.
const MAX_LITERAL: usize = 1 << 20;

impl Output {
    pub fn literal(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        while !bytes.is_empty() {
            let room = MAX_LITERAL - self.literal.len();
            let n = room.min(bytes.len());
            self.literal.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.literal.len() == MAX_LITERAL {
                self.cut();
            }
        }
    }

    /// Like [`Output::literal`], taking the bytes out of `bytes` (which is left empty) without
    /// copying them when nothing is pending.
    pub fn literal_from(&mut self, bytes: &mut Vec<u8>) {
        if self.literal.is_empty() && bytes.len() <= MAX_LITERAL {
            std::mem::swap(&mut self.literal, bytes);
            if self.literal.len() == MAX_LITERAL {
                self.cut();
            }
        } else {
            self.literal(bytes);
        }
        bytes.clear();
    }

    pub fn reference(&mut self, r: RegionRef) {
        self.cut();
        self.pieces.push(Piece::Ref(r));
    }

    fn cut(&mut self) {
        if !self.literal.is_empty() {
            self.pieces
                .push(Piece::Literal(std::mem::take(&mut self.literal)));
        }
    }

    pub fn take(&mut self) -> Vec<Piece> {
        self.cut();
        std::mem::take(&mut self.pieces)
    }
}

/// What a parser reports about its connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Why (part of) the connection went byte for byte, if it did.
    pub passthrough: Option<String>,
    pub regions_referenced: u64,
    /// Regions whose content was named and looked up (referenced or not).
    pub regions_considered: u64,
}

/// What kind of connection this turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Undecided,
    Main,
    Multifd,
    Other,
}

enum Parser {
    Undecided,
    Main(main_channel::MainChannel),
    Multifd(multifd::MultifdChannel),
    Raw,
}

/// The source relay's view of one QEMU connection.
pub struct SourceStream {
    parser: Parser,
    buf: Vec<u8>,
    namer: Arc<RegionNamer>,
    out: Output,
    report: StreamReport,
}

impl SourceStream {
    pub fn new(namer: Arc<RegionNamer>) -> Self {
        Self {
            parser: Parser::Undecided,
            buf: Vec::new(),
            namer,
            out: Output::default(),
            report: StreamReport::default(),
        }
    }

    pub fn kind(&self) -> ChannelKind {
        match self.parser {
            Parser::Undecided => ChannelKind::Undecided,
            Parser::Main(_) => ChannelKind::Main,
            Parser::Multifd(_) => ChannelKind::Multifd,
            Parser::Raw => ChannelKind::Other,
        }
    }

    pub fn report(&self) -> &StreamReport {
        &self.report
    }

    /// Feeds bytes read from QEMU; returns what to send for them (possibly nothing yet: a
    /// record or a region is completed by later bytes).
    pub fn push(&mut self, data: &[u8], holds: &dyn Holds) -> Vec<Piece> {
        if matches!(self.parser, Parser::Raw) && self.buf.is_empty() {
            self.out.literal(data);
            return self.out.take();
        }
        if self.buf.is_empty() {
            let used = self.parse(data, holds);
            self.buf.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.buf);
            buf.extend_from_slice(data);
            let used = self.parse(&buf, holds);
            buf.drain(..used);
            self.buf = buf;
        }
        self.out.take()
    }

    /// QEMU closed its side: whatever is still held (an unfinished record, a region run) goes
    /// as it is.
    pub fn finish(&mut self) -> Vec<Piece> {
        match &mut self.parser {
            Parser::Main(p) => p.finish(&mut self.out),
            Parser::Multifd(p) => p.finish(&mut self.out),
            Parser::Undecided | Parser::Raw => {}
        }
        let rest = std::mem::take(&mut self.buf);
        self.out.literal(&rest);
        self.out.take()
    }

    fn parse(&mut self, data: &[u8], holds: &dyn Holds) -> usize {
        if let Parser::Undecided = self.parser {
            if data.len() < 4 {
                return 0;
            }
            let magic = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
            self.parser = match magic {
                main_channel::FILE_MAGIC => Parser::Main(main_channel::MainChannel::new()),
                multifd::MULTIFD_MAGIC => Parser::Multifd(multifd::MultifdChannel::new()),
                _ => {
                    self.report.passthrough = Some(format!(
                        "not a QEMU migration stream (first bytes {magic:08x})"
                    ));
                    Parser::Raw
                }
            };
        }
        let ctx = Ctx {
            namer: &self.namer,
            holds,
        };
        match &mut self.parser {
            Parser::Main(p) => p.parse(data, &ctx, &mut self.out, &mut self.report),
            Parser::Multifd(p) => p.parse(data, &ctx, &mut self.out, &mut self.report),
            Parser::Raw => {
                self.out.literal(data);
                data.len()
            }
            Parser::Undecided => unreachable!("decided above"),
        }
    }
}

/// What a parser needs to decide about a region.
pub struct Ctx<'a> {
    pub namer: &'a RegionNamer,
    pub holds: &'a dyn Holds,
}

/// Expands pieces back into the bytes they stand for, with the source's own pages: what the
/// target rebuilds when every reference resolves. Tests use it to check a transform is exact.
pub fn expand(pieces: &[Piece]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Literal(b) => out.extend_from_slice(b),
            Piece::Ref(r) => {
                if !RegionRef::expand_with_pages(&r.parts, &r.pages, &mut out) {
                    return None;
                }
            }
        }
    }
    Some(out)
}
#[cfg(test)]
pub(crate) mod tests;
