//! Incremental rescans with the kernel's soft-dirty bits: writing `4` to
//! `/proc/<pid>/clear_refs` clears them, and bit 55 of each page's `/proc/<pid>/pagemap` entry is
//! set again when the page is written. Only regions with a dirtied page are re-hashed.
//!
//! Kernels built without `CONFIG_MEM_SOFT_DIRTY` accept the write but never set the bit, so
//! support is detected by experiment on our own memory ([`supported`]); without it the agent
//! falls back to [`super::dirty_sampler`].

use std::os::unix::fs::FileExt;

use crate::plan::region::PAGE_SIZE;

use super::AgentError;

const SOFT_DIRTY_BIT: u64 = 1 << 55;
const PRESENT_BIT: u64 = 1 << 63;
const SWAPPED_BIT: u64 = 1 << 62;

/// Clears the soft-dirty bits of every page of `pid`.
pub fn clear(pid: i32) -> Result<(), AgentError> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"4")
        .map_err(|e| AgentError::io(pid, "clear_refs", e))
}

/// For the pages of `[start, start + len)`: whether each was written since the last [`clear`].
/// A page that is neither present nor swapped out was never touched and is not dirty.
pub fn dirty_pages(pid: i32, start: u64, len: u64) -> Result<Vec<bool>, AgentError> {
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| AgentError::io(pid, "pagemap", e))?;
    let pages = (len as usize).div_ceil(PAGE_SIZE);
    let first = start / PAGE_SIZE as u64;
    let mut out = Vec::with_capacity(pages);
    const BATCH: usize = 64 * 1024;
    let mut buf = vec![0u8; BATCH * 8];
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(BATCH);
        let bytes = &mut buf[..n * 8];
        f.read_exact_at(bytes, (first + done as u64) * 8)
            .map_err(|e| AgentError::io(pid, "pagemap", e))?;
        out.extend(bytes.chunks_exact(8).map(|e| {
            let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            v & SOFT_DIRTY_BIT != 0 && v & (PRESENT_BIT | SWAPPED_BIT) != 0
        }));
        done += n;
    }
    Ok(out)
}

/// Whether this kernel tracks soft-dirty bits: clear them for ourselves, write a page, and see
/// whether the pagemap marks it.
pub fn supported() -> bool {
    let pid = std::process::id() as i32;
    let layout = match std::alloc::Layout::from_size_align(PAGE_SIZE, PAGE_SIZE) {
        Ok(l) => l,
        Err(_) => return false,
    };
    // SAFETY: non-zero size; freed below with the same layout.
    let page = unsafe { std::alloc::alloc_zeroed(layout) };
    if page.is_null() {
        return false;
    }
    let probe = || -> Result<bool, AgentError> {
        // SAFETY: `page` is a live allocation of PAGE_SIZE bytes; volatile so the write happens.
        unsafe { std::ptr::write_volatile(page, 1) };
        clear(pid)?;
        let before = dirty_pages(pid, page as u64, PAGE_SIZE as u64)?[0];
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(page, 2) };
        let after = dirty_pages(pid, page as u64, PAGE_SIZE as u64)?[0];
        Ok(!before && after)
    };
    let result = probe().unwrap_or(false);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(page, layout) };
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn detection_does_not_panic_and_is_stable() {
        assert_eq!(super::supported(), super::supported());
    }
}
