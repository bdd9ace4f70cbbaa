//! Streams written the way QEMU writes them, for the parser's tests, the relay's loopback
//! tests and its benchmark. Made here, not captured: each byte's meaning is spelled out.

use std::collections::HashSet;
use std::sync::Arc;

use super::main_channel::*;
use super::multifd::MULTIFD_MAGIC;
use super::{Holds, RegionNamer};
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

impl Default for MainWriter {
    fn default() -> Self {
        Self::new()
    }
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

pub fn short(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

pub fn sub(out: &mut Vec<u8>, name: &str, fields: &[u8]) {
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

/// A multifd packet without pages (a sync) whose header says `pages_alloc` and
/// `next_packet_size` as given: QEMU 10.0 sends 0 and 0, QEMU 7.2 the allocation and a stale
/// size.
pub fn multifd_empty_packet(pages_alloc: u32, next_packet_size: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&pages_alloc.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&next_packet_size.to_be_bytes());
    out.extend_from_slice(&[0u8; 8 + 4 + 28 + 256]);
    out.extend_from_slice(&[0u8; 8 * 128]);
    out
}
