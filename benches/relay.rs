//! Relay speed and memory, printed: the source's stream transform and the target's rebuild per
//! core on a stream with half its regions held by the target (main channel and multifd), the
//! target index's bytes per GiB indexed, and the wire bytes against the bytes the planner
//! would count as "to move" for the same content.
//!
//! `cargo bench --bench relay` (release build, one thread per side).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use commonground::plan::region::PAGE_SIZE;
use commonground::relay::protocol::Frame;
use commonground::relay::rebuild::{Action, Rebuilder, RegionReader};
use commonground::relay::store::IdMap;
use commonground::relay::stream::fixtures::{
    multifd_stream, namer, page, region_content, HoldsSet, MainWriter,
};
use commonground::relay::stream::{Piece, SourceStream};

const REGION: usize = 16 * PAGE_SIZE;

struct Memory(HashMap<u64, Vec<u8>>);

impl RegionReader for Memory {
    fn read(&mut self, id: u64) -> Option<&[u8]> {
        self.0.get(&id).map(|v| v.as_slice())
    }
}

/// A precopy stream of `regions` regions; every other region held by the target.
fn main_stream(regions: u64) -> (Vec<u8>, HashMap<u64, Vec<u8>>) {
    let n = namer();
    let mut w = MainWriter::new();
    w.ram_start(&[("pc.ram", regions * REGION as u64)]);
    w.ram_part();
    let mut held = HashMap::new();
    for r in 0..regions {
        let pages: Vec<_> = (0..16).map(|i| (i, page(r * 16 + i as u64))).collect();
        for (i, p) in &pages {
            w.page("pc.ram", (r * 16 + *i as u64) * PAGE_SIZE as u64, p);
        }
        if r % 2 == 0 {
            let c = region_content(&pages);
            held.insert(n.identify(&c).unwrap(), c);
        }
    }
    w.eos();
    w.ram_end();
    w.eos();
    w.devices_and_eof();
    (w.bytes, held)
}

fn multifd(regions: u64) -> (Vec<u8>, HashMap<u64, Vec<u8>>) {
    let n = namer();
    let packets: Vec<(u64, usize)> = (0..regions / 8).map(|p| (p * 128, 128)).collect();
    let stream = multifd_stream(&packets, 0);
    let mut held = HashMap::new();
    for r in (0..regions).step_by(2) {
        let pages: Vec<_> = (0..16).map(|i| (i, page(r * 16 + i as u64))).collect();
        let c = region_content(&pages);
        held.insert(n.identify(&c).unwrap(), c);
    }
    (stream, held)
}

/// What the source relay does per read: parse, name runs, encode frames (a data frame's
/// bytes follow its header uncopied, as the relay writes them). With `keep`, the frames are
/// also joined for the target pass (outside the timed runs).
fn source_pass(stream: &[u8], holds: &HoldsSet, keep: bool) -> (Vec<Vec<u8>>, usize, u64) {
    let mut s = SourceStream::new(namer());
    let mut frames = Vec::new();
    let mut wire = 0usize;
    let mut emit = |p: Piece, frames: &mut Vec<Vec<u8>>| {
        let f = match p {
            Piece::Literal(b) => {
                let mut h = Frame::data_header(b.len());
                wire += h.len() + b.len();
                if !keep {
                    return;
                }
                h.extend_from_slice(&b);
                h
            }
            Piece::Ref(r) => {
                let mut f = Vec::new();
                Frame::from_ref(&r).encode(&mut f);
                wire += f.len();
                f
            }
        };
        if keep {
            frames.push(f);
        }
    };
    for chunk in stream.chunks(256 << 10) {
        for p in s.push(chunk, holds) {
            emit(p, &mut frames);
        }
    }
    for p in s.finish() {
        emit(p, &mut frames);
    }
    (frames, wire, s.report().regions_referenced)
}

fn target_pass(frames: &[Vec<u8>], memory: &mut Memory) -> usize {
    let mut r = Rebuilder::new(namer());
    let mut out = Vec::new();
    let mut delivered = 0;
    for f in frames {
        if f.is_empty() {
            continue;
        }
        let (frame, _) = Frame::decode(f).unwrap().unwrap();
        r.push(frame, memory, &mut out).unwrap();
        for a in out.drain(..) {
            if let Action::Write(b) = a {
                delivered += b.len();
            }
        }
    }
    delivered
}

fn run(name: &str, stream: Vec<u8>, held: HashMap<u64, Vec<u8>>) {
    let holds = HoldsSet(held.keys().copied().collect::<HashSet<_>>());
    let mut memory = Memory(held);
    let gib = stream.len() as f64 / (1u64 << 30) as f64;
    let mut best_src = f64::MAX;
    let mut best_dst = f64::MAX;
    let mut result = None;
    let (frames, _, _) = source_pass(&stream, &holds, true);
    for _ in 0..5 {
        let t = Instant::now();
        let (_, wire, refs) = source_pass(&stream, &holds, false);
        best_src = best_src.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let delivered = target_pass(&frames, &mut memory);
        best_dst = best_dst.min(t.elapsed().as_secs_f64());
        assert_eq!(delivered, stream.len());
        result = Some((wire, refs));
    }
    let (wire, refs) = result.unwrap();
    println!(
        "relay/{name}: {:.0} MiB stream, {refs} regions referenced; source {:.2} GiB/s, target {:.2} GiB/s per core; frames {:.1}% of the stream",
        stream.len() as f64 / (1 << 20) as f64,
        gib / best_src,
        gib / best_dst,
        100.0 * wire as f64 / stream.len() as f64,
    );
    // The planner counts a held region as not to move and every other non-zero region as
    // to move: here half the regions' bytes.
    let to_move = (stream.len() / 2) as f64;
    println!(
        "relay/{name}: frame bytes vs the planner's to-move bytes: {:+.2}%",
        100.0 * (wire as f64 - to_move) / to_move
    );
}

fn index_memory() {
    // One GiB of distinct regions, indexed as the store indexes them.
    let regions = (1u64 << 30) / REGION as u64;
    let mut map: IdMap<(u32, u64)> = IdMap::default();
    for i in 0..regions {
        map.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), (0, i));
    }
    let entry = std::mem::size_of::<(u64, (u32, u64))>() + 1;
    let bytes = map.capacity() * entry;
    println!(
        "relay/store: {} regions per GiB indexed take {:.0} KiB ({:.3}% of the memory indexed, {:.1} B per region)",
        regions,
        bytes as f64 / 1024.0,
        100.0 * bytes as f64 / (1u64 << 30) as f64,
        bytes as f64 / regions as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (s, h) = main_stream(4096);
    run("main-channel", s, h);
    let (s, h) = multifd(4096);
    run("multifd", s, h);
    index_memory();
}
