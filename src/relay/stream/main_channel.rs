//! QEMU's main migration channel (precopy): the file header, the configuration section, then
//! sections. Only the RAM section is read record by record; its pages go through a
//! [`RegionRun`]. The first section that is not RAM (device state at the end of a precopy
//! migration, or anything else) and everything after it go byte for byte.
//!
//! Layout read here (big-endian, as QEMU 7.2 to 10.x write it):
//! - header: magic `QEVM`, version 3;
//! - configuration (type 0x07): machine type (be32 length + bytes), then subsections
//!   (0x05, name, be32 version, fields);
//! - section start/full (0x01/0x04): be32 section id, name, be32 instance, be32 version;
//!   part/end (0x02/0x03): be32 section id; then the section's data and a footer
//!   (0x7e, be32 section id);
//! - command (0x08): be16 command, be16 length, data;
//! - RAM data: records of be64 `offset | flags`; a page record without the CONTINUE flag
//!   names its block (one-byte length, name); a zero page has one fill byte, a normal page
//!   4 KiB; MEM_SIZE opens the block list (name, be64 length per block); EOS ends the data.

use super::cursor::Cursor;
use super::region_run::RegionRun;
use super::{Ctx, Output, StreamReport};
use crate::plan::region::PAGE_SIZE;

pub const FILE_MAGIC: u32 = 0x5145_564d;
pub const FILE_VERSION: u32 = 3;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

pub const RAM_ZERO: u64 = 0x02;
pub const RAM_MEM_SIZE: u64 = 0x04;
pub const RAM_PAGE: u64 = 0x08;
pub const RAM_EOS: u64 = 0x10;
pub const RAM_CONTINUE: u64 = 0x20;
const RAM_XBZRLE: u64 = 0x40;
const RAM_HOOK: u64 = 0x80;
const RAM_COMPRESS: u64 = 0x100;
pub const RAM_MULTIFD_FLUSH: u64 = 0x200;
const FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// Most RAM blocks a block list may name before it is taken for garbage.
const MAX_BLOCKS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Ram,
    /// After a RAM section's end-of-section flag: its footer, if the stream has footers.
    RamFooter,
    Raw,
}

pub struct MainChannel {
    state: State,
    ram_section: Option<u32>,
    block: Option<Vec<u8>>,
    run: Option<RegionRun>,
}

enum Step {
    /// Consumed this many bytes.
    Done(usize),
    NeedMore,
    /// Forward from here on byte for byte; `Some` is a reason worth reporting.
    Raw(Option<String>),
}

impl Default for MainChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl MainChannel {
    pub fn new() -> Self {
        Self {
            state: State::Header,
            ram_section: None,
            block: None,
            run: None,
        }
    }

    /// Parses as much of `data` as forms whole items; returns the bytes consumed.
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
            if rest.is_empty() {
                return pos;
            }
            let step = match self.state {
                State::Header => {
                    let step = header(rest, out);
                    if let Step::Done(_) = step {
                        self.state = State::Top;
                    }
                    step
                }
                State::Top => self.top(rest, out),
                State::Ram => self.ram_record(rest, ctx, out, report),
                State::RamFooter => self.ram_footer(rest, out),
                State::Raw => unreachable!("handled above"),
            };
            match step {
                Step::Done(n) => pos += n,
                Step::NeedMore => return pos,
                Step::Raw(reason) => {
                    self.flush_run(ctx, out, report);
                    if let Some(r) = reason {
                        report.passthrough.get_or_insert(r);
                    }
                    self.state = State::Raw;
                }
            }
        }
    }

    pub fn finish(&mut self, out: &mut Output) {
        // A run still open at the end goes as it is: nothing more will complete it.
        if let Some(run) = self.run.as_mut() {
            run.flush_as_is(out);
        }
    }

    fn flush_run(&mut self, ctx: &Ctx, out: &mut Output, report: &mut StreamReport) {
        if let Some(run) = self.run.as_mut() {
            run.flush(ctx, out, report);
        }
    }

    fn top(&mut self, rest: &[u8], out: &mut Output) -> Step {
        let mut c = Cursor::new(rest);
        let Some(kind) = c.u8() else {
            return Step::NeedMore;
        };
        let parsed = match kind {
            CONFIGURATION => match configuration(&mut c) {
                Ok(Some(())) => Ok(()),
                Ok(None) => return Step::NeedMore,
                Err(reason) => return Step::Raw(Some(reason)),
            },
            SECTION_START | SECTION_FULL => {
                let (Some(id), Some(name), Some(_instance), Some(_version)) =
                    (c.be32(), c.short_str(), c.be32(), c.be32())
                else {
                    return Step::NeedMore;
                };
                if kind == SECTION_START && name == b"ram" && self.ram_section.is_none() {
                    self.ram_section = Some(id);
                    self.state = State::Ram;
                    Ok(())
                } else {
                    Err(())
                }
            }
            SECTION_PART | SECTION_END => {
                let Some(id) = c.be32() else {
                    return Step::NeedMore;
                };
                if Some(id) == self.ram_section {
                    self.state = State::Ram;
                    Ok(())
                } else {
                    Err(())
                }
            }
            COMMAND => {
                let (Some(_cmd), Some(len)) = (c.be16(), c.be16()) else {
                    return Step::NeedMore;
                };
                if c.take(len as usize).is_none() {
                    return Step::NeedMore;
                }
                Ok(())
            }
            // End of stream, the VM description, or something unknown: the rest as it is.
            _ => Err(()),
        };
        match parsed {
            Ok(()) => {
                out.literal(&rest[..c.pos()]);
                Step::Done(c.pos())
            }
            // Device state and anything after it: nothing more to save there.
            Err(()) => Step::Raw(None),
        }
    }

    fn ram_footer(&mut self, rest: &[u8], out: &mut Output) -> Step {
        self.state = State::Top;
        if rest[0] != SECTION_FOOTER {
            return Step::Done(0);
        }
        let mut c = Cursor::new(rest);
        c.u8();
        let Some(id) = c.be32() else {
            self.state = State::RamFooter;
            return Step::NeedMore;
        };
        if Some(id) != self.ram_section {
            return Step::Raw(Some(format!(
                "RAM section footer names section {id}, not the RAM section"
            )));
        }
        out.literal(&rest[..5]);
        Step::Done(5)
    }

    fn ram_record(
        &mut self,
        rest: &[u8],
        ctx: &Ctx,
        out: &mut Output,
        report: &mut StreamReport,
    ) -> Step {
        let mut c = Cursor::new(rest);
        let Some(word) = c.be64() else {
            return Step::NeedMore;
        };
        let flags = word & FLAG_MASK;
        let addr = word & !FLAG_MASK;
        let page_kind = flags & (RAM_ZERO | RAM_PAGE);
        if flags & (RAM_XBZRLE | RAM_COMPRESS | RAM_HOOK) != 0 {
            let what = if flags & RAM_XBZRLE != 0 {
                "XBZRLE-encoded pages"
            } else if flags & RAM_COMPRESS != 0 {
                "compressed pages"
            } else {
                "RDMA control records"
            };
            return Step::Raw(Some(format!("the RAM stream has {what}")));
        }
        if page_kind == RAM_ZERO || page_kind == RAM_PAGE {
            if flags & !(page_kind | RAM_CONTINUE) != 0 {
                return Step::Raw(Some(format!("unknown RAM flags {flags:#x}")));
            }
            if flags & RAM_CONTINUE == 0 {
                let Some(name) = c.short_str() else {
                    return Step::NeedMore;
                };
                self.block = Some(name.to_vec());
            } else if self.block.is_none() {
                return Step::Raw(Some("a RAM page continues a block never named".into()));
            }
            let (payload_at, fill) = if page_kind == RAM_ZERO {
                let Some(fill) = c.u8() else {
                    return Step::NeedMore;
                };
                (None, Some(fill))
            } else {
                let at = c.pos();
                if c.take(PAGE_SIZE).is_none() {
                    return Step::NeedMore;
                }
                (Some(at), None)
            };
            let record = &rest[..c.pos()];
            let block = self.block.as_deref().expect("set above");
            let run = self
                .run
                .get_or_insert_with(|| RegionRun::new(ctx.namer.region_bytes()));
            run.add(ctx, out, report, block, addr, record, payload_at, fill);
            return Step::Done(c.pos());
        }
        // Anything but a page ends the region run first.
        self.flush_run(ctx, out, report);
        match flags {
            RAM_MEM_SIZE => {
                let total = addr;
                let mut sum = 0u64;
                let mut blocks = 0;
                while sum < total {
                    let (Some(_name), Some(len)) = (c.short_str(), c.be64()) else {
                        return Step::NeedMore;
                    };
                    sum = sum.saturating_add(len);
                    blocks += 1;
                    if sum > total || blocks > MAX_BLOCKS {
                        return Step::Raw(Some(
                            "the RAM block list does not add up to the RAM size (hugepages with \
                             postcopy, or ignore-shared)"
                                .into(),
                        ));
                    }
                }
            }
            RAM_EOS => self.state = State::RamFooter,
            RAM_MULTIFD_FLUSH => {}
            _ => return Step::Raw(Some(format!("unknown RAM flags {flags:#x}"))),
        }
        out.literal(&rest[..c.pos()]);
        Step::Done(c.pos())
    }
}

fn header(rest: &[u8], out: &mut Output) -> Step {
    let mut c = Cursor::new(rest);
    let (Some(magic), Some(version)) = (c.be32(), c.be32()) else {
        return Step::NeedMore;
    };
    if magic != FILE_MAGIC {
        return Step::Raw(Some("not a QEMU migration stream".into()));
    }
    if version != FILE_VERSION {
        return Step::Raw(Some(format!("QEMU stream version {version}")));
    }
    out.literal(&rest[..8]);
    Step::Done(8)
}

/// The configuration section after its type byte: `Ok(None)` when more bytes are needed,
/// `Err` when a subsection is one this parser does not know.
fn configuration(c: &mut Cursor) -> Result<Option<()>, String> {
    let Some(len) = c.be32() else {
        return Ok(None);
    };
    if len > 256 {
        return Err(format!("a machine type name of {len} bytes"));
    }
    if c.take(len as usize).is_none() {
        return Ok(None);
    }
    loop {
        match c.peek_u8() {
            None => return Ok(None),
            Some(SUBSECTION) => {}
            Some(_) => return Ok(Some(())),
        }
        c.u8();
        let (Some(name), Some(_version)) = (c.short_str(), c.be32()) else {
            return Ok(None);
        };
        let known = match name {
            b"configuration/target-page-bits" => {
                let Some(bits) = c.be32() else {
                    return Ok(None);
                };
                if bits != 12 {
                    return Err(format!("target pages of 2^{bits} bytes"));
                }
                true
            }
            b"configuration/capabilities" => {
                let Some(count) = c.be32() else {
                    return Ok(None);
                };
                if count > 256 {
                    return Err(format!("{count} migration capabilities"));
                }
                for _ in 0..count {
                    if c.short_str().is_none() {
                        return Ok(None);
                    }
                }
                true
            }
            b"configuration/uuid" => {
                if c.take(16).is_none() {
                    return Ok(None);
                }
                true
            }
            _ => false,
        };
        if !known {
            return Err(format!(
                "unknown configuration subsection {}",
                String::from_utf8_lossy(name)
            ));
        }
    }
}
