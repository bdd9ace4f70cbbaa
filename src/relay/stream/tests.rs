//! Byte-for-byte tests of the stream parsers on streams written the way QEMU writes them.

use super::main_channel::RAM_CONTINUE;
use std::collections::HashSet;

use proptest::prelude::*;

pub use super::fixtures::*;
use super::*;
use crate::plan::region::PAGE_SIZE;

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
fn multifd_sync_packets_of_either_version_keep_the_fixed_header() {
    // As captured: 10.0 says 0 pages allocated, 7.2 leaves a stale packet size.
    let mut stream = multifd_stream(&[(0, 16)], 0);
    stream.extend(multifd_empty_packet(0, 0));
    stream.extend(multifd_empty_packet(128, 524_288));
    stream.extend(&multifd_stream(&[(16, 16)], 0)[64..]);
    let n = namer();
    let held = |r: u64| {
        let pages: Vec<_> = (0..16).map(|i| (i, page(r * 16 + i as u64))).collect();
        n.identify(&region_content(&pages)).unwrap()
    };
    let (pieces, report) = transform(&stream, &HoldsSet([held(0), held(1)].into()), &[777]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert_eq!(report.passthrough, None);
    assert_eq!(refs(&pieces), 2);
}

#[test]
fn a_region_cut_by_a_multifd_packet_boundary_is_still_one_run() {
    // Pages 0..100, then 100..128: region 6 (pages 96..112) spans both packets.
    let mut stream = multifd_stream(&[(0, 100)], 0);
    stream.extend(&multifd_stream(&[(100, 28)], 0)[64..]);
    stream.extend(multifd_empty_packet(128, 0));
    let n = namer();
    let pages: Vec<_> = (0..16).map(|i| (i, page(96 + i as u64))).collect();
    let id = n.identify(&region_content(&pages)).unwrap();
    let (pieces, report) = transform(&stream, &HoldsSet([id].into()), &[]);
    assert_eq!(expand(&pieces).unwrap(), stream);
    assert_eq!(refs(&pieces), 1);
    assert_eq!(report.regions_referenced, 1);
    // The reference carries the second packet's header between its pages.
    let Some(Piece::Ref(r)) = pieces.iter().find(|p| matches!(p, Piece::Ref(_))) else {
        unreachable!()
    };
    assert!(r.parts.iter().any(|p| p.literal.len() == 1344));
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
