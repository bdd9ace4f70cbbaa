//! Network namespaces: running a program, or opening a listening socket, inside another
//! process's network namespace (virt-handler's), while the rest of the agent stays in its own.
//!
//! A socket belongs to the namespace it was created in for its whole life, so the listener is
//! made on a short-lived thread that entered the namespace (`setns` changes only the calling
//! thread) and then used from anywhere.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::InterceptError;

/// A network namespace, named by a file that refers to it: `/proc/<pid>/ns/net` of a process
/// in it, or `/run/netns/<name>` for one made by `ip netns add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs(pub PathBuf);

impl NetNs {
    /// The namespace of process `pid`.
    pub fn of_process(pid: i32) -> Self {
        NetNs(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn open(&self) -> Result<File, InterceptError> {
        File::open(&self.0).map_err(|e| InterceptError::Namespace {
            path: self.0.clone(),
            what: format!("open: {e}"),
        })
    }

    /// Runs `f` on a thread of its own inside this namespace and returns its result. Sockets
    /// `f` creates stay in the namespace after the thread has ended.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, InterceptError> {
        let ns = self.open()?;
        let err = |what: String| InterceptError::Namespace {
            path: self.0.clone(),
            what,
        };
        std::thread::spawn(move || -> Result<T, String> {
            enter(&ns).map_err(|e| format!("setns: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| err("the thread inside the namespace panicked".into()))?
        .map_err(err)
    }

    /// Opens a TCP listener on `addr` inside this namespace (non-blocking, for tokio).
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, InterceptError> {
        self.run_in(move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })?
        .map_err(|e| InterceptError::Namespace {
            path: self.0.clone(),
            what: format!("listen on {addr}: {e}"),
        })
    }

    /// Connects to `to` from inside this namespace, with the packet mark `mark` (which the
    /// interception rules let through), within `timeout`.
    pub fn connect(
        &self,
        to: SocketAddr,
        mark: u32,
        timeout: std::time::Duration,
    ) -> Result<std::net::TcpStream, InterceptError> {
        self.run_in(move || -> std::io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_mark(mark)?;
            s.set_tcp_nodelay(true)?;
            s.connect_timeout(&to.into(), timeout)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })?
        .map_err(|e| InterceptError::Namespace {
            path: self.0.clone(),
            what: format!("connect to {to}: {e}"),
        })
    }

    /// Whether `ip` is an address of this namespace (a socket can be bound to it).
    pub fn is_local(&self, ip: std::net::IpAddr) -> Result<bool, InterceptError> {
        self.run_in(move || match TcpListener::bind(SocketAddr::new(ip, 0)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Ok(false),
            Err(e) => Err(e),
        })?
        .map_err(|e| InterceptError::Namespace {
            path: self.0.clone(),
            what: format!("bind to {ip}: {e}"),
        })
    }

    /// [`Self::connect`] from async code (on a blocking thread), as a tokio stream.
    pub async fn connect_async(
        &self,
        to: SocketAddr,
        mark: u32,
        timeout: std::time::Duration,
    ) -> Result<tokio::net::TcpStream, InterceptError> {
        let ns = self.clone();
        let std = tokio::task::spawn_blocking(move || ns.connect(to, mark, timeout))
            .await
            .map_err(|e| InterceptError::Namespace {
                path: self.0.clone(),
                what: format!("connect to {to}: {e}"),
            })??;
        tokio::net::TcpStream::from_std(std).map_err(|e| InterceptError::Namespace {
            path: self.0.clone(),
            what: format!("connect to {to}: {e}"),
        })
    }

    /// Makes `cmd` start inside this namespace (the namespace file is opened now; the child
    /// enters it between fork and exec).
    pub fn command(&self, program: &str) -> Result<std::process::Command, InterceptError> {
        use std::os::unix::process::CommandExt;
        let ns = self.open()?;
        let mut cmd = std::process::Command::new(program);
        // SAFETY: setns is an async-signal-safe system call on a descriptor the closure owns;
        // nothing else of the parent is touched between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                enter(&ns)?;
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Moves the calling thread into the network namespace `ns` refers to.
fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: a plain system call on an open descriptor.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
