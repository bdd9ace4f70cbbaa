//! Where the source relay decides that a region goes as a reference.
//!
//! QEMU sends guest RAM page by page. A run collects the consecutive pages of one aligned
//! region of one RAM block (the planning core's geometry: `pages_per_region` pages from a
//! region boundary of the block) exactly as they appeared in the stream, headers included.
//! When the run ends (the next page belongs elsewhere, or something else comes), its content
//! is named: the pages it carries, with every page it does not carry taken as zero (QEMU sends
//! zero pages as a flag, or on another channel). If the target holds content with that
//! identity, the run becomes a reference whose parts rebuild the exact bytes; otherwise the
//! bytes go as they are. A page of the region the run does not carry is never rebuilt, so the
//! zero guess can only make a match less likely, never wrong.

use crate::plan::region::PAGE_SIZE;

use super::{Ctx, Output, RefPart, RegionRef, StreamReport};

pub struct RegionRun {
    active: bool,
    block: Vec<u8>,
    region: u64,
    last_page: Option<usize>,
    /// The run's bytes as they were in the stream.
    raw: Vec<u8>,
    /// (page index in the region, offset of its 4 KiB payload in `raw`)
    pages: Vec<(usize, usize)>,
    /// Zero-page records whose fill byte is not zero (old QEMUs): (page index, fill).
    fills: Vec<(usize, u8)>,
    content: Vec<u8>,
}

impl RegionRun {
    pub fn new(region_bytes: usize) -> Self {
        Self {
            active: false,
            block: Vec::new(),
            region: 0,
            last_page: None,
            raw: Vec::new(),
            pages: Vec::new(),
            fills: Vec::new(),
            content: vec![0; region_bytes],
        }
    }

    /// Adds one record of page `addr` (its offset in `block`) to the run, ending the current
    /// run first if the page belongs to another region or comes out of order. `record` is the
    /// record's bytes; `payload_at` where its page payload starts in it, if it carries one.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        ctx: &Ctx,
        out: &mut Output,
        report: &mut StreamReport,
        block: &[u8],
        addr: u64,
        record: &[u8],
        payload_at: Option<usize>,
        fill: Option<u8>,
    ) {
        let region_bytes = ctx.namer.region_bytes() as u64;
        let region = addr / region_bytes;
        let page = ((addr % region_bytes) / PAGE_SIZE as u64) as usize;
        if self.active
            && (self.block != block
                || self.region != region
                || self.last_page.is_some_and(|last| page <= last))
        {
            self.flush(ctx, out, report);
        }
        if !self.active {
            self.active = true;
            self.block.clear();
            self.block.extend_from_slice(block);
            self.region = region;
        }
        if let Some(at) = payload_at {
            self.pages.push((page, self.raw.len() + at));
        }
        if let Some(f) = fill.filter(|f| *f != 0) {
            self.fills.push((page, f));
        }
        self.raw.extend_from_slice(record);
        self.last_page = Some(page);
        // The region's last page: nothing more can join the run.
        if page + 1 == ctx.namer.pages_per_region() {
            self.flush(ctx, out, report);
        }
    }

    /// Bytes that are not a page but may sit between two pages of one region (the header of
    /// the next multifd packet): inside the run if one is open, else straight out.
    pub fn add_literal(&mut self, out: &mut Output, bytes: &[u8]) {
        if self.active {
            self.raw.extend_from_slice(bytes);
        } else {
            out.literal(bytes);
        }
    }

    /// Ends the run: a reference if the target holds its content, else its bytes.
    pub fn flush(&mut self, ctx: &Ctx, out: &mut Output, report: &mut StreamReport) {
        if !self.active {
            return;
        }
        match self.reference(ctx, report) {
            Some(r) => {
                out.reference(r);
                self.active = false;
                self.flush_as_is(out);
            }
            None => self.flush_as_is(out),
        }
    }

    /// Ends the run with its bytes as they are.
    pub fn flush_as_is(&mut self, out: &mut Output) {
        if self.active {
            out.literal_from(&mut self.raw);
        }
        self.active = false;
        self.last_page = None;
        self.raw.clear();
        self.pages.clear();
        self.fills.clear();
    }

    /// Page `i` of the region as the run has it: its bytes, `None` for zero (absent, or a
    /// zero-page record), or the fill of an old QEMU's non-zero fill record.
    fn page_bytes(&self, i: usize) -> Option<&[u8]> {
        if let Some(&(_, at)) = self.pages.iter().find(|(p, _)| *p == i) {
            return Some(&self.raw[at..at + PAGE_SIZE]);
        }
        if self.fills.iter().any(|(p, _)| *p == i) {
            return Some(&self.content[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        None
    }

    fn reference(&mut self, ctx: &Ctx, report: &mut StreamReport) -> Option<RegionRef> {
        if self.pages.is_empty() {
            return None;
        }
        for &(page, fill) in &self.fills {
            self.content[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(fill);
        }
        let n = ctx.namer.pages_per_region();
        report.regions_considered += 1;
        let id = ctx
            .namer
            .identify_pages((0..n).map(|i| self.page_bytes(i)))?;
        if !ctx.holds.holds(id) {
            return None;
        }
        report.regions_referenced += 1;
        let mut parts = Vec::with_capacity(self.pages.len() + 1);
        let mut pages = Vec::with_capacity(self.pages.len() * PAGE_SIZE);
        let mut from = 0;
        for &(page, at) in &self.pages {
            parts.push(RefPart {
                literal: self.raw[from..at].to_vec(),
                page: Some(page as u16),
            });
            pages.extend_from_slice(&self.raw[at..at + PAGE_SIZE]);
            from = at + PAGE_SIZE;
        }
        if from < self.raw.len() {
            parts.push(RefPart {
                literal: self.raw[from..].to_vec(),
                page: None,
            });
        }
        Some(RegionRef {
            id,
            verifier: ctx.namer.verifier_pages((0..n).map(|i| self.page_bytes(i))),
            parts,
            pages,
        })
    }
}
