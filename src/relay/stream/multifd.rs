//! A multifd channel: an initial packet naming the channel, then packets of up to
//! `pages_alloc` pages of one RAM block. Each packet is a fixed header, the page offsets, and
//! the normal pages' bytes in offset order. Consecutive pages of one aligned region in a
//! packet form a [`RegionRun`]; the header and offsets always go as they are.
//!
//! Layout (big-endian, QEMU 7.2 to 10.x, no compression):
//! - initial packet, 64 bytes: magic 0x11223344, be32 version 1, 16-byte UUID, channel id,
//!   reserved bytes;
//! - packet header, 320 bytes: magic, be32 version, be32 flags, be32 pages_alloc, be32
//!   normal_pages, be32 next_packet_size, be64 packet number, be32 zero_pages (reserved and
//!   zero before QEMU 9.0, which sent zero pages on the main channel), reserved bytes, the
//!   block name in 256 bytes; then room for 128 be64 offsets (normal pages first, then zero
//!   pages), whatever `pages_alloc` says; then normal_pages × 4 KiB. A packet without pages
//!   (a sync) may carry a stale next_packet_size.

use super::cursor::Cursor;
use super::region_run::RegionRun;
use super::{Ctx, Output, StreamReport};
use crate::plan::region::PAGE_SIZE;

pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
const MULTIFD_VERSION: u32 = 1;
const INIT_LEN: usize = 64;
const HEADER_LEN: usize = 320;
const FLAG_SYNC: u32 = 1;
const FLAG_COMPRESSION_MASK: u32 = 7 << 1;
/// Offsets every packet header carries room for, whatever its own `pages_alloc` says: QEMU
/// sizes packets by its fixed 512 KiB packet (128 pages of 4 KiB), and sends sync packets
/// with `pages_alloc` 0 (10.0) but the same header.
const PACKET_PAGES: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    Packet,
    Raw,
}

pub struct MultifdChannel {
    state: State,
    run: Option<RegionRun>,
}

impl Default for MultifdChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdChannel {
    pub fn new() -> Self {
        Self {
            state: State::Init,
            run: None,
        }
    }

    pub fn parse(
        &mut self,
        data: &[u8],
        ctx: &Ctx,
        out: &mut Output,
        report: &mut StreamReport,
    ) -> usize {
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            if self.state == State::Raw {
                out.literal(rest);
                return data.len();
            }
            let step = match self.state {
                State::Init => init(rest, out),
                State::Packet => self.packet(rest, ctx, out, report),
                State::Raw => unreachable!("handled above"),
            };
            match step {
                Ok(Some(n)) => {
                    pos += n;
                    self.state = State::Packet;
                }
                Ok(None) => return pos,
                Err(reason) => {
                    report.passthrough.get_or_insert(reason);
                    self.state = State::Raw;
                }
            }
        }
    }

    pub fn finish(&mut self, out: &mut Output) {
        if let Some(run) = self.run.as_mut() {
            run.flush_as_is(out);
        }
    }

    /// One whole packet, or `Ok(None)` until all of it is here.
    fn packet(
        &mut self,
        rest: &[u8],
        ctx: &Ctx,
        out: &mut Output,
        report: &mut StreamReport,
    ) -> Result<Option<usize>, String> {
        let mut c = Cursor::new(rest);
        let (Some(magic), Some(version), Some(flags), Some(alloc), Some(normal), Some(next)) =
            (c.be32(), c.be32(), c.be32(), c.be32(), c.be32(), c.be32())
        else {
            return Ok(None);
        };
        let (Some(_packet_num), Some(zero)) = (c.be64(), c.be32()) else {
            return Ok(None);
        };
        if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
            return Err(format!(
                "multifd packet magic {magic:08x} version {version}"
            ));
        }
        if flags & FLAG_COMPRESSION_MASK != 0 {
            return Err("multifd compression".into());
        }
        if flags & !FLAG_SYNC != 0 {
            return Err(format!("multifd packet flags {flags:#x}"));
        }
        // A packet without pages may carry a stale next_packet_size (7.2): its data is empty.
        if alloc as usize > PACKET_PAGES
            || normal as u64 + zero as u64 > PACKET_PAGES as u64
            || (normal > 0 && next as u64 != normal as u64 * PAGE_SIZE as u64)
        {
            return Err(format!(
                "multifd packet of {alloc} pages, {normal} normal, {zero} zero, {next} bytes"
            ));
        }
        let header_len = HEADER_LEN + 8 * PACKET_PAGES;
        let total = header_len + normal as usize * PAGE_SIZE;
        if rest.len() < total {
            return Ok(None);
        }
        let name_field = &rest[64..HEADER_LEN];
        let block = &name_field[..name_field.iter().position(|b| *b == 0).unwrap_or(256)];
        let offsets = &rest[HEADER_LEN..header_len];
        let run = self
            .run
            .get_or_insert_with(|| RegionRun::new(ctx.namer.region_bytes()));
        // Packets are cut by page count, not at region boundaries (QEMU 7.2 leaves zero pages
        // out of them), so a region's pages may continue in the next packet: the run stays
        // open across the header in between. A sync ends it: QEMU waits for syncs.
        let sync = flags & FLAG_SYNC != 0;
        if sync {
            run.flush(ctx, out, report);
        }
        run.add_literal(out, &rest[..header_len]);
        for i in 0..normal as usize {
            let addr = u64::from_be_bytes(offsets[8 * i..8 * i + 8].try_into().expect("8"));
            let at = header_len + i * PAGE_SIZE;
            let page = &rest[at..at + PAGE_SIZE];
            run.add(ctx, out, report, block, addr, page, Some(0), None);
        }
        if sync {
            run.flush(ctx, out, report);
        }
        Ok(Some(total))
    }
}

fn init(rest: &[u8], out: &mut Output) -> Result<Option<usize>, String> {
    if rest.len() < INIT_LEN {
        return Ok(None);
    }
    let mut c = Cursor::new(rest);
    let (magic, version) = (c.be32().expect("64 bytes"), c.be32().expect("64 bytes"));
    if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
        return Err(format!(
            "multifd channel magic {magic:08x} version {version}"
        ));
    }
    out.literal(&rest[..INIT_LEN]);
    Ok(Some(INIT_LEN))
}
