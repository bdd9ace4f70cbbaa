//! Reading another process's memory with `process_vm_readv(2)`: one system call per chunk, no
//! ptrace stop, the target keeps running. Needs ptrace-read permission on the target (root with
//! `CAP_SYS_PTRACE`, or the same user).
//!
//! Ranges that cannot be read (unmapped since the maps were read, guard pages, I/O memory) are
//! reported as unreadable and skipped; a target that exits mid-read is reported, not an error.

use super::AgentError;

/// What one read returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Every byte was read.
    Complete,
    /// The first `n` bytes were read; the rest could not be (fault in the target).
    Partial(usize),
    /// The process is gone (or has no memory any more: a zombie).
    Exited,
}

/// A handle on one process's memory.
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    pid: i32,
}

impl ProcessMemory {
    /// Checks that the process exists and that its memory can be read, so that a caller gets a
    /// clear error up front (no such process, or permission denied) instead of an empty scan.
    pub fn open(pid: i32) -> Result<Self, AgentError> {
        if pid <= 0 {
            return Err(AgentError::NoProcess(pid));
        }
        let me = Self { pid };
        // A one-byte read at address 0 (never mapped): the kernel finds the process (ESRCH)
        // and checks ptrace access (EPERM) before it touches memory (EFAULT, the success case).
        let mut byte = [0u8; 1];
        match me.raw_read(&mut [(0, &mut byte[..])]) {
            Ok(_) => Ok(me),
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Ok(me),
            Err(e) => Err(me.classify(e)),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn classify(&self, e: std::io::Error) -> AgentError {
        match e.raw_os_error() {
            Some(libc::ESRCH) => AgentError::NoProcess(self.pid),
            Some(libc::EPERM) | Some(libc::EACCES) => AgentError::PermissionDenied {
                pid: self.pid,
                what: "read its memory (needs ptrace-read access: same user, or CAP_SYS_PTRACE)",
            },
            _ => AgentError::io(self.pid, "mem", e),
        }
    }

    /// One `process_vm_readv` call over `(remote address, local buffer)` pairs.
    fn raw_read(&self, parts: &mut [(u64, &mut [u8])]) -> std::io::Result<usize> {
        let local: Vec<libc::iovec> = parts
            .iter_mut()
            .map(|(_, buf)| libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            })
            .collect();
        let remote: Vec<libc::iovec> = parts
            .iter()
            .map(|(addr, buf)| libc::iovec {
                iov_base: *addr as usize as *mut libc::c_void,
                iov_len: buf.len(),
            })
            .collect();
        // SAFETY: every local iovec points into a live, exclusively borrowed buffer of the
        // stated length; the remote iovecs are only addresses in the other process, which the
        // kernel checks.
        let n = unsafe {
            libc::process_vm_readv(
                self.pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Reads `buf.len()` bytes at `addr`. Faults give [`ReadOutcome::Partial`]; a process that
    /// exited gives [`ReadOutcome::Exited`]; permission problems are errors.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<ReadOutcome, AgentError> {
        if buf.is_empty() {
            return Ok(ReadOutcome::Complete);
        }
        let len = buf.len();
        match self.raw_read(&mut [(addr, buf)]) {
            Ok(n) if n == len => Ok(ReadOutcome::Complete),
            Ok(0) if !self.alive() => Ok(ReadOutcome::Exited),
            Ok(n) => Ok(ReadOutcome::Partial(n)),
            Err(e) => match e.raw_os_error() {
                Some(libc::EFAULT) | Some(libc::EIO) | Some(libc::ENOMEM) => {
                    if self.alive() {
                        Ok(ReadOutcome::Partial(0))
                    } else {
                        Ok(ReadOutcome::Exited)
                    }
                }
                Some(libc::ESRCH) => Ok(ReadOutcome::Exited),
                _ => Err(self.classify(e)),
            },
        }
    }

    /// Reads many small pieces (for example sampled pages) in batches of at most `IOV_MAX`
    /// iovecs. Returns, per piece, whether it was read completely, or `None` if the process
    /// exited.
    pub fn read_many(
        &self,
        parts: &mut [(u64, &mut [u8])],
    ) -> Result<Option<Vec<bool>>, AgentError> {
        const BATCH: usize = 1024;
        let mut ok = Vec::with_capacity(parts.len());
        for batch in parts.chunks_mut(BATCH) {
            let want: usize = batch.iter().map(|(_, b)| b.len()).sum();
            match self.raw_read(batch) {
                Ok(n) if n == want => ok.extend(std::iter::repeat_n(true, batch.len())),
                Ok(_) | Err(_) => {
                    // Something in the batch faulted: read each piece on its own.
                    for (addr, buf) in batch.iter_mut() {
                        match self.read(*addr, buf)? {
                            ReadOutcome::Complete => ok.push(true),
                            ReadOutcome::Partial(_) => ok.push(false),
                            ReadOutcome::Exited => return Ok(None),
                        }
                    }
                }
            }
        }
        Ok(Some(ok))
    }

    /// Whether the process still has an address space (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => !matches!(
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next()),
                Some('Z') | Some('X') | None
            ),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_reports_faults() {
        let me = ProcessMemory::open(std::process::id() as i32).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut buf = vec![0u8; data.len()];
        assert_eq!(
            me.read(data.as_ptr() as u64, &mut buf).unwrap(),
            ReadOutcome::Complete
        );
        assert_eq!(buf, data);
        // Page zero is never mapped.
        let mut small = [0u8; 16];
        assert_eq!(me.read(0, &mut small).unwrap(), ReadOutcome::Partial(0));
    }

    #[test]
    fn missing_process_is_a_named_error() {
        let err = ProcessMemory::open(i32::MAX).unwrap_err().to_string();
        assert!(err.contains(&i32::MAX.to_string()), "{err}");
    }
}
