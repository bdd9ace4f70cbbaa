//! The executor: one `nft -i` process per network namespace, which creates the interception
//! table (owned by it, see [`super::ruleset`]) and then applies every change the agent asks for.
//! The process is the table's lifeline. It is started with `PR_SET_PDEATHSIG`, so it dies with
//! the thread that started it, and the kernel drops the table with it. Dropping the
//! [`OwnedTable`] kills it too.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::netns::NetNs;
use super::ruleset::{self, NftError, Reply, ReplyReader};
use super::InterceptError;

/// How long `nft` may take to answer a batch.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The interception table of one network namespace, alive while this value is.
pub struct OwnedTable {
    netns: NetNs,
    nft: String,
    stdin: ChildStdin,
    pid: i32,
    lines: mpsc::Receiver<String>,
    /// Tells the owner thread to kill the `nft -i` child.
    stop: mpsc::Sender<()>,
}

impl std::fmt::Debug for OwnedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedTable")
            .field("netns", &self.netns)
            .field("pid", &self.pid)
            .finish()
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl OwnedTable {
    /// Starts `nft -i` (the `nft` program) in `netns` and creates the table with its redirect
    /// to `relay_port`. Fails when the table cannot be created, or exists already under
    /// another owner (another agent serving this namespace).
    pub fn create(netns: &NetNs, nft: &str, relay_port: u16) -> Result<Self, InterceptError> {
        let spawn_err = |e: std::io::Error| InterceptError::Nft(format!("starting {nft} -i: {e}"));
        let (read_end, write_end) = pipe().map_err(spawn_err)?;
        let mut cmd = netns.command(nft)?;
        cmd.arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write_end.try_clone().map_err(spawn_err)?))
            .stderr(Stdio::from(write_end));
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // The child dies with the thread that started it: a thread of its own, which lives
        // exactly as long as the child (it waits for it), so neither outlives the other.
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("nft-owner".into())
            .spawn(move || {
                let spawned = cmd.spawn();
                // The command holds the write ends of the output pipe: closed now, the reader
                // sees the end of the output when the child exits.
                drop(cmd);
                match spawned {
                    Ok(mut child) => {
                        let stdin = child.stdin.take();
                        let _ = tx.send(Ok((stdin, child.id() as i32)));
                        // Until the table is dropped (or the agent exits, and this thread with it).
                        let _ = stopped.recv();
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(spawn_err)?;
        let (stdin, pid) = rx
            .recv()
            .map_err(|_| InterceptError::Nft("the nft owner thread ended".into()))?
            .map_err(spawn_err)?;
        let stdin = stdin.ok_or_else(|| InterceptError::Nft("nft -i has no stdin".into()))?;
        let (line_tx, lines) = mpsc::channel();
        let reader = BufReader::new(std::fs::File::from(read_end));
        std::thread::Builder::new()
            .name("nft-output".into())
            .spawn(move || {
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if line_tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(spawn_err)?;
        let mut table = OwnedTable {
            netns: netns.clone(),
            nft: nft.to_string(),
            stdin,
            pid,
            lines,
            stop,
        };
        let text = match table.run(&ruleset::create_table(relay_port))? {
            Reply::Listing { text, errors } if errors.is_empty() => text,
            Reply::Listing { errors, .. } | Reply::Missing { errors } => {
                return Err(InterceptError::Refused(join(&errors)));
            }
        };
        if !ruleset::table_is_owned(&text) {
            return Err(InterceptError::Refused(
                "the table was created without the owner flag (this kernel cannot tie it to the agent's life)".into(),
            ));
        }
        tracing::info!(netns = %netns.path().display(), pid, relay_port, "interception table created");
        Ok(table)
    }

    /// The pid of the `nft -i` process that owns the table.
    pub fn owner_pid(&self) -> i32 {
        self.pid
    }

    /// Sends `commands`, then the listing request, and waits for the reply.
    fn run(&mut self, commands: &str) -> Result<Reply, InterceptError> {
        let write_err = |e: std::io::Error| InterceptError::Nft(format!("writing to nft -i: {e}"));
        self.stdin
            .write_all(commands.as_bytes())
            .map_err(write_err)?;
        self.stdin
            .write_all(ruleset::list_table_command().as_bytes())
            .map_err(write_err)?;
        self.stdin.flush().map_err(write_err)?;
        let mut reader = ReplyReader::default();
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(reply) = reader.feed(&line) {
                        return Ok(reply);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(InterceptError::Nft(format!(
                        "nft -i did not answer within {REPLY_TIMEOUT:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(InterceptError::Nft("nft -i exited".into()))
                }
            }
        }
    }

    fn apply(&mut self, commands: &str) -> Result<(), InterceptError> {
        match self.run(commands)? {
            Reply::Listing { errors, .. } => {
                let unexpected: Vec<NftError> =
                    errors.into_iter().filter(|e| !e.is_expected()).collect();
                if unexpected.is_empty() {
                    Ok(())
                } else {
                    Err(InterceptError::Refused(join(&unexpected)))
                }
            }
            Reply::Missing { .. } => Err(InterceptError::Refused(
                "the interception table is gone".into(),
            )),
        }
    }

    /// Redirects new connections to `targets` to the relay, for at most `timeout`.
    pub fn redirect(
        &mut self,
        targets: &[SocketAddr],
        timeout: Duration,
    ) -> Result<(), InterceptError> {
        self.apply(&ruleset::add_targets(targets, timeout))
    }

    /// Stops redirecting new connections to `targets`.
    pub fn release(&mut self, targets: &[SocketAddr]) -> Result<(), InterceptError> {
        self.apply(&ruleset::remove_targets(targets))
    }

    /// The destinations redirected now, as the kernel holds them (read by a separate `nft`).
    pub fn targets(&self) -> Result<BTreeSet<SocketAddr>, InterceptError> {
        let mut out = BTreeSet::new();
        for v6 in [false, true] {
            let o = self
                .netns
                .command(&self.nft)?
                .args(ruleset::list_set_args(v6))
                .output()
                .map_err(|e| InterceptError::Nft(format!("running {}: {e}", self.nft)))?;
            if !o.status.success() {
                return Err(InterceptError::Nft(format!(
                    "nft list set: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
            let text = String::from_utf8_lossy(&o.stdout);
            out.extend(
                ruleset::parse_set_elements(&text)?
                    .into_iter()
                    .map(|(a, _)| a),
            );
        }
        Ok(out)
    }
}

fn join(errors: &[NftError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        tracing::info!(netns = %self.netns.path().display(), pid = self.pid, "interception table released");
    }
}
