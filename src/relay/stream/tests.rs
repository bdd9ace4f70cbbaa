//! Byte-for-byte tests of the stream parsers on streams written the way QEMU writes them.

use std::collections::HashSet;
use std::sync::Arc;

use proptest::prelude::*;

use super::main_channel::*;
use super::multifd::MULTIFD_MAGIC;
use super::*;
use crate::plan::region::{ClusterKey, PAGE_SIZE};

pub struct HoldsSet(pub HashSet<u64>);

impl Holds for HoldsSet {
    fn holds(&self, id: u64) -> bool {
        self.0.contains(&id)
    }
}

pub fn namer() -> Arc<RegionNamer> {
    Arc::new(RegionNamer::new(ClusterKey::development(), 16))
}

/// A page whose content is determined by `seed` (never all zero).
pub fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64 | 1).to_le_bytes(),
        );
    }
    p
}

/// Writes a main-channel stream the way QEMU's precopy does.
pub struct MainWriter {
    pub bytes: Vec<u8>,
    last_block: Option<String>,
}

impl MainWriter {
    pub fn new() -> Self {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&FILE_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&FILE_VERSION.to_be_bytes());
        // configuration: machine type and the three subsections QEMU writes
        bytes.push(0x07);
        bytes.extend_from_slice(&(11u32).to_be_bytes());
        bytes.extend_from_slice(b"pc-i440fx-7");
        sub(
            &mut bytes,
            "configuration/target-page-bits",
            &12u32.to_be_bytes(),
        );
        let mut caps = 1u32.to_be_bytes().to_vec();
        caps.push(15);
        caps.extend_from_slice(b"x-ignore-shared");
        sub(&mut bytes, "configuration/capabilities", &caps);
        sub(&mut bytes, "configuration/uuid", &[7u8; 16]);
        // a command (open return path): be16 command, be16 length, data
        bytes.extend_from_slice(&[0x08, 0, 1, 0, 0]);
        Self {
            bytes,
            last_block: None,
        }
    }

    pub fn ram_start(&mut self, blocks: &[(&str, u64)]) {
        self.bytes.push(0x01);
        self.bytes.extend_from_slice(&2u32.to_be_bytes());
        short(&mut self.bytes, "ram");
        self.bytes.extend_from_slice(&0u32.to_be_bytes());
        self.bytes.extend_from_slice(&4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.bytes
            .extend_from_slice(&(total | RAM_MEM_SIZE).to_be_bytes());
        for (name, len) in blocks {
            short(&mut self.bytes, name);
            self.bytes.extend_from_slice(&len.to_be_bytes());
        }
        self.eos();
    }

    pub fn ram_part(&mut self) {
        self.bytes.push(0x02);
        self.bytes.extend_from_slice(&2u32.to_be_bytes());
    }

    pub fn ram_end(&mut self) {
        self.bytes.push(0x03);
        self.bytes.extend_from_slice(&2u32.to_be_bytes());
    }

    pub fn eos(&mut self) {
        self.bytes.extend_from_slice(&RAM_EOS.to_be_bytes());
        self.bytes.push(0x7e);
        self.bytes.extend_from_slice(&2u32.to_be_bytes());
    }

    fn record(&mut self, block: &str, offset: u64, flag: u64) {
        let cont = self.last_block.as_deref() == Some(block);
        let word = offset | flag | if cont { RAM_CONTINUE } else { 0 };
        self.bytes.extend_from_slice(&word.to_be_bytes());
        if !cont {
            short(&mut self.bytes, block);
            self.last_block = Some(block.to_string());
        }
    }

    pub fn page(&mut self, block: &str, offset: u64, content: &[u8]) {
        self.record(block, offset, RAM_PAGE);
        self.bytes.extend_from_slice(content);
    }

    pub fn zero(&mut self, block: &str, offset: u64) {
        self.record(block, offset, RAM_ZERO);
        self.bytes.push(0);
    }

    /// Device state and the end of the stream.
    pub fn devices_and_eof(&mut self) {
        self.bytes.push(0x04);
        self.bytes.extend_from_slice(&3u32.to_be_bytes());
        short(&mut self.bytes, "timer");
        self.bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
        self.bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        self.bytes.push(0x7e);
        self.bytes.extend_from_slice(&3u32.to_be_bytes());
        self.bytes.push(0x00);
    }
}

fn short(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn sub(out: &mut Vec<u8>, name: &str, fields: &[u8]) {
    out.push(0x05);
    short(out, name);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(fields);
}

/// The region content a run of pages stands for (absent pages zero).
pub fn region_content(pages: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut c = vec![0u8; 16 * PAGE_SIZE];
    for (i, p) in pages {
        c[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(p);
    }
    c
}

/// A guest of `regions` regions: region r has pages with seeds r*16+i, and every fourth page
/// of odd regions is zero. Returns the stream and the identity of every region.
fn guest_stream(regions: u64) -> (Vec<u8>, Vec<u64>) {
    let n = namer();
    let mut w = MainWriter::new();
    let block_len = regions * 16 * PAGE_SIZE as u64;
    w.ram_start(&[("pc.ram", block_len), ("vga.vram", 1 << 20)]);
    w.ram_part();
    let mut ids = Vec::new();
    for r in 0..regions {
        let mut present = Vec::new();
        for i in 0..16u64 {
            let offset = (r * 16 + i) * PAGE_SIZE as u64;
            if r % 2 == 1 && i % 4 == 0 {
                w.zero("pc.ram", offset);
            } else {
                let p = page(r * 16 + i);
                w.page("pc.ram", offset, &p);
                present.push((i as usize, p));
            }
        }
        ids.push(n.identify(&region_content(&present)).unwrap());
    }
    w.eos();
    w.ram_end();
    w.eos();
    w.devices_and_eof();
    (w.bytes, ids)
}

fn transform(input: &[u8], holds: &dyn Holds, chunks: &[usize]) -> (Vec<Piece>, StreamReport) {
    let mut s = SourceStream::new(namer());
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < input.len() {
        let n = chunks
            .get(k % chunks.len().max(1))
            .copied()
            .unwrap_or(input.len())
            .clamp(1, input.len() - at);
        pieces.extend(s.push(&input[at..at + n], holds));
        at += n;
        k += 1;
    }
    pieces.extend(s.finish());
    (pieces, s.report().clone())
}

fn refs(pieces: &[Piece]) -> usize {
    pieces.iter().filter(|p| matches!(p, Piece::Ref(_))).count()
}

#[test]
fn held_regions_become_references_and_the_rest_stays_byte_for_byte() {
    let (stream, ids) = guest_stream(8);
    let held: HashSet<u64> = ids.iter().step_by(2).copied().collect();
    let (pieces, report) = transform(&stream, &HoldsSet(held), &[]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert_eq!(report.passthrough, None);
    assert_eq!(refs(&pieces), 4);
    assert_eq!(report.regions_referenced, 4);
    assert_eq!(report.regions_considered, 8);
    assert_eq!(
        report.passthrough, None,
        "device state at the end is not a pass-through"
    );
    let literal: usize = pieces
        .iter()
        .map(|p| match p {
            Piece::Literal(b) => b.len(),
            Piece::Ref(_) => 0,
        })
        .sum();
    // The four even regions (16 pages each; the first record also names the block) left the
    // literal bytes, headers and all.
    assert_eq!(
        literal,
        stream.len() - 4 * 16 * (8 + PAGE_SIZE) - (1 + "pc.ram".len())
    );
}

#[test]
fn a_reference_rebuilds_its_exact_bytes_from_the_region_content() {
    let (stream, ids) = guest_stream(2);
    let (pieces, _) = transform(&stream, &HoldsSet(ids.iter().copied().collect()), &[]);
    let mut rebuilt = Vec::new();
    for p in &pieces {
        match p {
            Piece::Literal(b) => rebuilt.extend_from_slice(b),
            Piece::Ref(r) => {
                // What the target reads from its memory: the whole region, zero pages included.
                let mut region = vec![0u8; 16 * PAGE_SIZE];
                let mut next = 0;
                for part in &r.parts {
                    if let Some(i) = part.page {
                        region[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
                            .copy_from_slice(&r.pages[next..next + PAGE_SIZE]);
                        next += PAGE_SIZE;
                    }
                }
                assert_eq!(namer().verifier(&region), r.verifier);
                assert!(RegionRef::expand_with_region(
                    &r.parts,
                    &region,
                    &mut rebuilt
                ));
            }
        }
    }
    assert_eq!(rebuilt, stream);
}

#[test]
fn nothing_held_means_nothing_referenced() {
    let (stream, _) = guest_stream(4);
    let (pieces, report) = transform(&stream, &HoldsNothing, &[]);
    assert_eq!(refs(&pieces), 0);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert_eq!(report.regions_considered, 4);
}

#[test]
fn pages_out_of_order_or_across_blocks_end_a_run() {
    let n = namer();
    let mut w = MainWriter::new();
    w.ram_start(&[("a", 1 << 20), ("b", 1 << 20)]);
    w.ram_part();
    // Region 0 of a, pages 0..8, then region 0 of b, then pages 8..16 of a's region 0.
    let a: Vec<_> = (0..16).map(|i| (i, page(100 + i as u64))).collect();
    for (i, p) in &a[..8] {
        w.page("a", (*i * PAGE_SIZE) as u64, p);
    }
    for i in 0..16u64 {
        w.page("b", i * PAGE_SIZE as u64, &page(200 + i));
    }
    for (i, p) in &a[8..] {
        w.page("a", (*i * PAGE_SIZE) as u64, p);
    }
    w.eos();
    // The whole of a's region 0 is held, but it never came as one run: never referenced.
    let id_a = n.identify(&region_content(&a)).unwrap();
    let first_half = n.identify(&region_content(&a[..8])).unwrap();
    let (pieces, _) = transform(&w.bytes, &HoldsSet([id_a].into()), &[]);
    assert_eq!(refs(&pieces), 0);
    // The first half, taken with zeros for the rest, is a run of its own.
    let (pieces, _) = transform(&w.bytes, &HoldsSet([first_half].into()), &[]);
    assert_eq!(refs(&pieces), 1);
    assert_eq!(expand(&pieces).unwrap(), w.bytes);
}

#[test]
fn unknown_ram_flags_pass_the_rest_through_with_the_reason() {
    let mut w = MainWriter::new();
    w.ram_start(&[("pc.ram", 1 << 20)]);
    w.ram_part();
    w.page("pc.ram", 0, &page(1));
    // An XBZRLE record: the parser cannot rebuild it, so everything from here goes as it is.
    w.bytes
        .extend_from_slice(&(0x1000u64 | 0x40 | RAM_CONTINUE).to_be_bytes());
    w.bytes.extend_from_slice(&[1, 0, 4, 9, 9, 9, 9]);
    for i in 2..40 {
        w.page("pc.ram", i * PAGE_SIZE as u64, &page(i));
    }
    let everything: HashSet<u64> = (0..64).map(|_| 0).collect();
    let (pieces, report) = transform(&w.bytes, &HoldsSet(everything), &[3, 4096, 7]);
    assert_eq!(expand(&pieces).unwrap(), w.bytes);
    assert_eq!(refs(&pieces), 0);
    assert!(report.passthrough.unwrap().contains("XBZRLE"));
}

#[test]
fn a_stream_that_is_not_qemus_passes_through_byte_for_byte() {
    let junk: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (pieces, report) = transform(&junk, &HoldsNothing, &[1, 999, 65536]);
    assert_eq!(expand(&pieces).unwrap(), junk);
    assert!(report
        .passthrough
        .unwrap()
        .contains("not a QEMU migration stream"));
}

#[test]
fn another_stream_version_or_an_unknown_subsection_passes_through() {
    let mut v = MainWriter::new().bytes;
    v[7] = 4;
    let (pieces, report) = transform(&v, &HoldsNothing, &[]);
    assert_eq!(expand(&pieces).unwrap(), v);
    assert!(report.passthrough.unwrap().contains("version 4"));

    let mut w = MainWriter::new();
    w.bytes.truncate(8 + 1 + 4 + 11);
    sub(&mut w.bytes, "configuration/new-thing", &[1, 2, 3]);
    w.bytes.extend_from_slice(&[0x01, 0, 0, 0, 2]);
    let (pieces, report) = transform(&w.bytes, &HoldsNothing, &[]);
    assert_eq!(expand(&pieces).unwrap(), w.bytes);
    assert!(report
        .passthrough
        .unwrap()
        .contains("configuration/new-thing"));
}

/// A multifd channel: the initial packet, then packets of `per_packet` normal pages of
/// "pc.ram" starting at page `first`.
pub fn multifd_stream(packets: &[(u64, usize)], zero_pages: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&[0u8; 16]);
    out.push(3);
    out.extend_from_slice(&[0u8; 39]);
    for (num, &(first, count)) in packets.iter().enumerate() {
        let alloc = 128u32;
        out.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&alloc.to_be_bytes());
        out.extend_from_slice(&(count as u32).to_be_bytes());
        out.extend_from_slice(&((count * PAGE_SIZE) as u32).to_be_bytes());
        out.extend_from_slice(&(num as u64).to_be_bytes());
        out.extend_from_slice(&zero_pages.to_be_bytes());
        out.extend_from_slice(&[0u8; 28]);
        let mut name = [0u8; 256];
        name[..6].copy_from_slice(b"pc.ram");
        out.extend_from_slice(&name);
        for i in 0..alloc as u64 {
            let off = if (i as usize) < count {
                (first + i) * PAGE_SIZE as u64
            } else if (i as usize) < count + zero_pages as usize {
                (first + count as u64 + i) * PAGE_SIZE as u64
            } else {
                0
            };
            out.extend_from_slice(&off.to_be_bytes());
        }
        for i in 0..count as u64 {
            out.extend_from_slice(&page(first + i));
        }
    }
    out
}

#[test]
fn multifd_packets_reference_held_regions_and_keep_headers() {
    let n = namer();
    // 128 pages from page 0 (8 regions), and 40 pages from page 200 (ends mid-region).
    let stream = multifd_stream(&[(0, 128), (200, 40)], 0);
    let region = |r: u64| {
        let pages: Vec<_> = (0..16).map(|i| (i, page(r * 16 + i as u64))).collect();
        n.identify(&region_content(&pages)).unwrap()
    };
    let held: HashSet<u64> = [region(0), region(3), region(13)].into();
    let (pieces, report) = transform(&stream, &HoldsSet(held), &[5000, 13]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    // Region 13 (pages 208..224) lies whole inside the second packet.
    assert_eq!(refs(&pieces), 3);
    assert_eq!(report.regions_referenced, 3);
    assert_eq!(report.passthrough, None);
}

#[test]
fn multifd_compression_passes_through() {
    let mut stream = multifd_stream(&[(0, 16)], 0);
    stream[64 + 11] = 2; // flags: zlib
    let (pieces, report) = transform(&stream, &HoldsNothing, &[]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert!(report.passthrough.unwrap().contains("compression"));
}

#[test]
fn multifd_zero_pages_of_newer_qemu_are_part_of_the_packet() {
    let stream = multifd_stream(&[(0, 20), (32, 16)], 4);
    let (pieces, report) = transform(&stream, &HoldsNothing, &[]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert_eq!(report.passthrough, None);
    // Pages 0..20 are two runs (regions 0 and 1), pages 32..48 one.
    assert_eq!(report.regions_considered, 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// However QEMU's bytes are cut into reads, the output stands for exactly the input.
    #[test]
    fn any_read_sizes_give_the_same_bytes(chunks in proptest::collection::vec(1usize..70_000, 1..8), every in 1usize..4) {
        let (stream, ids) = guest_stream(6);
        let held: HashSet<u64> = ids.iter().step_by(every).copied().collect();
        let expected = ids.len().div_ceil(every);
        let (pieces, _) = transform(&stream, &HoldsSet(held), &chunks);
        prop_assert_eq!(expand(&pieces).unwrap(), stream);
        prop_assert_eq!(refs(&pieces), expected);
    }

    /// Corrupt or truncated streams never panic and always come out as they went in.
    #[test]
    fn damaged_streams_pass_through_exactly(cut in 0usize..200_000, flip in 0usize..200_000, bit in 0u8..8) {
        let (mut stream, ids) = guest_stream(4);
        let at = flip % stream.len();
        stream[at] ^= 1 << bit;
        stream.truncate(cut.min(stream.len()));
        let (pieces, _) = transform(&stream, &HoldsSet(ids.into_iter().collect()), &[4097]);
        prop_assert_eq!(expand(&pieces).unwrap(), stream);
    }
}
