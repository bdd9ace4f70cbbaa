//! Where the relays listen and connect: TCP (`HOST:PORT`) or a unix socket (`unix:PATH`, the
//! way KubeVirt's launcher and handler hand a migration over), and a byte counter around the
//! inter-relay TCP connection so statistics report what really crossed the wire.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::RelayError;

pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Self, RelayError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(RelayError::Argument(format!("{text:?}: empty socket path")));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        let text = text.strip_prefix("tcp:").unwrap_or(text);
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(text.to_string()))
            }
            _ => Err(RelayError::Argument(format!(
                "{text:?} is neither HOST:PORT nor unix:PATH"
            ))),
        }
    }

    pub async fn connect(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Endpoint::Unix(path) => Box::new(UnixStream::connect(path).await?),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, RelayError> {
        let err = |e| RelayError::Listen {
            addr: endpoint.to_string(),
            source: e,
        };
        Ok(match endpoint {
            Endpoint::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).await.map_err(err)?),
            Endpoint::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Listener::Unix(UnixListener::bind(path).map_err(err)?)
            }
        })
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_default(),
        }
    }

    pub async fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Bytes read and written through a connection.
#[derive(Clone, Default)]
pub struct ByteCounter {
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl ByteCounter {
    pub fn total(&self) -> u64 {
        self.read.load(Ordering::Relaxed) + self.written.load(Ordering::Relaxed)
    }
}

pub struct Counted<S> {
    inner: S,
    counter: ByteCounter,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counter: ByteCounter) -> Self {
        Self { inner, counter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counter.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counter.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_tcp_and_unix_and_refuse_the_rest() {
        assert_eq!(
            Endpoint::parse("10.0.0.1:4444").unwrap(),
            Endpoint::Tcp("10.0.0.1:4444".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:[::1]:4444").unwrap(),
            Endpoint::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert!(Endpoint::parse("nohost").is_err());
        assert!(Endpoint::parse("host:99999").is_err());
        assert!(Endpoint::parse("unix:").is_err());
    }
}
