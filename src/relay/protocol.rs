//! What travels between the two relays, over one mutual-TLS connection per QEMU connection.
//!
//! Every frame is a type byte, a be32 payload length and the payload. The source opens with
//! `Hello`; on the first connection of a migration the target answers with `Filter`, the
//! identities of the regions its node holds. Then the source sends the stream as `Data`
//! (bytes as they are) and `Ref` (a region the target rebuilds from its own memory). The
//! target acknowledges references in order (`Ack`: every reference before this count is
//! delivered); one it cannot rebuild it asks for (`Resend`), and the source, which kept the
//! pages of every unacknowledged reference, answers `Resent` with them. `Reverse` carries
//! what the target QEMU sends back on the connection; `End` says a side's QEMU closed its
//! writing side; `Refused` says why the target cannot deliver.

use crate::relay::stream::{RefPart, RegionRef};

pub const PROTOCOL_VERSION: u16 = 1;
/// No frame is larger: a literal piece is at most 1 MiB, a reference at most a region plus
/// its headers, a filter is sent in chunks.
pub const MAX_FRAME: usize = 16 << 20;
/// Identities per `Filter` frame.
pub const FILTER_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        session: u64,
        index: u32,
        deliver_to: String,
    },
    Data(Vec<u8>),
    Ref {
        id: u64,
        verifier: [u8; 16],
        parts: Vec<RefPart>,
    },
    Resent {
        seq: u64,
        pages: Vec<u8>,
    },
    End,
    /// Identities the target holds; `last` marks the final chunk.
    Filter {
        ids: Vec<u64>,
        last: bool,
    },
    Ack {
        upto: u64,
    },
    Resend {
        seq: u64,
    },
    Reverse(Vec<u8>),
    Refused(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame type {0} is unknown")]
    UnknownType(u8),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("relay protocol version {0} is not supported (this relay speaks {PROTOCOL_VERSION})")]
    Version(u16),
}

const T_HELLO: u8 = 1;
const T_DATA: u8 = 2;
const T_REF: u8 = 3;
const T_RESENT: u8 = 4;
const T_END: u8 = 5;
const T_FILTER: u8 = 6;
const T_ACK: u8 = 7;
const T_RESEND: u8 = 8;
const T_REVERSE: u8 = 9;
const T_REFUSED: u8 = 10;

const NO_PAGE: u16 = u16::MAX;

impl Frame {
    pub fn from_ref(r: &RegionRef) -> Frame {
        Frame::Ref {
            id: r.id,
            verifier: r.verifier,
            parts: r.parts.clone(),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 5]);
        let kind = match self {
            Frame::Hello {
                version,
                session,
                index,
                deliver_to,
            } => {
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&session.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(deliver_to.as_bytes());
                T_HELLO
            }
            Frame::Data(b) => {
                out.extend_from_slice(b);
                T_DATA
            }
            Frame::Ref {
                id,
                verifier,
                parts,
            } => {
                encode_ref(out, *id, verifier, parts);
                T_REF
            }
            Frame::Resent { seq, pages } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(pages);
                T_RESENT
            }
            Frame::End => T_END,
            Frame::Filter { ids, last } => {
                out.push(*last as u8);
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
                T_FILTER
            }
            Frame::Ack { upto } => {
                out.extend_from_slice(&upto.to_be_bytes());
                T_ACK
            }
            Frame::Resend { seq } => {
                out.extend_from_slice(&seq.to_be_bytes());
                T_RESEND
            }
            Frame::Reverse(b) => {
                out.extend_from_slice(b);
                T_REVERSE
            }
            Frame::Refused(reason) => {
                out.extend_from_slice(reason.as_bytes());
                T_REFUSED
            }
        };
        let len = (out.len() - start - 5) as u32;
        out[start] = kind;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` until a whole frame is there,
    /// else the frame and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(ProtocolError::TooLarge(len));
        }
        if buf.len() < 5 + len {
            return Ok(None);
        }
        let p = &buf[5..5 + len];
        let frame = match kind {
            T_HELLO => {
                if p.len() < 14 {
                    return Err(ProtocolError::Malformed("hello"));
                }
                let version = u16::from_be_bytes([p[0], p[1]]);
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version(version));
                }
                Frame::Hello {
                    version,
                    session: be64(&p[2..10]),
                    index: u32::from_be_bytes(p[10..14].try_into().expect("4 bytes")),
                    deliver_to: String::from_utf8(p[14..].to_vec())
                        .map_err(|_| ProtocolError::Malformed("hello"))?,
                }
            }
            T_DATA => Frame::Data(p.to_vec()),
            T_REF => decode_ref(p)?,
            T_RESENT => {
                if p.len() < 8 {
                    return Err(ProtocolError::Malformed("resent"));
                }
                Frame::Resent {
                    seq: be64(&p[..8]),
                    pages: p[8..].to_vec(),
                }
            }
            T_END => Frame::End,
            T_FILTER => {
                if p.is_empty() || !(p.len() - 1).is_multiple_of(8) {
                    return Err(ProtocolError::Malformed("filter"));
                }
                Frame::Filter {
                    last: p[0] != 0,
                    ids: p[1..].chunks_exact(8).map(be64).collect(),
                }
            }
            T_ACK | T_RESEND => {
                if p.len() != 8 {
                    return Err(ProtocolError::Malformed("ack"));
                }
                let n = be64(p);
                if kind == T_ACK {
                    Frame::Ack { upto: n }
                } else {
                    Frame::Resend { seq: n }
                }
            }
            T_REVERSE => Frame::Reverse(p.to_vec()),
            T_REFUSED => Frame::Refused(String::from_utf8_lossy(p).into_owned()),
            other => return Err(ProtocolError::UnknownType(other)),
        };
        Ok(Some((frame, 5 + len)))
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn encode_ref(out: &mut Vec<u8>, id: u64, verifier: &[u8; 16], parts: &[RefPart]) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(verifier);
    out.extend_from_slice(&(parts.len() as u32).to_be_bytes());
    for part in parts {
        out.extend_from_slice(&(part.literal.len() as u32).to_be_bytes());
        out.extend_from_slice(&part.literal);
        out.extend_from_slice(&part.page.unwrap_or(NO_PAGE).to_be_bytes());
    }
}

fn decode_ref(p: &[u8]) -> Result<Frame, ProtocolError> {
    let bad = || ProtocolError::Malformed("ref");
    if p.len() < 28 {
        return Err(bad());
    }
    let id = be64(&p[..8]);
    let verifier: [u8; 16] = p[8..24].try_into().expect("16 bytes");
    let n = u32::from_be_bytes(p[24..28].try_into().expect("4 bytes")) as usize;
    if n > 4096 {
        return Err(bad());
    }
    let mut parts = Vec::with_capacity(n);
    let mut at = 28;
    for _ in 0..n {
        let len =
            u32::from_be_bytes(p.get(at..at + 4).ok_or_else(bad)?.try_into().expect("4")) as usize;
        at += 4;
        let literal = p.get(at..at + len).ok_or_else(bad)?.to_vec();
        at += len;
        let page = u16::from_be_bytes(p.get(at..at + 2).ok_or_else(bad)?.try_into().expect("2"));
        at += 2;
        parts.push(RefPart {
            literal,
            page: (page != NO_PAGE).then_some(page),
        });
    }
    if at != p.len() {
        return Err(bad());
    }
    Ok(Frame::Ref {
        id,
        verifier,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        buf.extend_from_slice(b"next");
        let (back, used) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(back, f);
        assert_eq!(used, buf.len() - 4);
        for cut in 0..used {
            assert_eq!(Frame::decode(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn every_frame_round_trips_and_waits_for_its_last_byte() {
        round_trip(Frame::Hello {
            version: PROTOCOL_VERSION,
            session: 7,
            index: 3,
            deliver_to: "10.0.0.2:4444".into(),
        });
        round_trip(Frame::Data(vec![1, 2, 3]));
        round_trip(Frame::Ref {
            id: 42,
            verifier: [9; 16],
            parts: vec![
                RefPart {
                    literal: vec![0xaa; 8],
                    page: Some(0),
                },
                RefPart {
                    literal: vec![],
                    page: None,
                },
            ],
        });
        round_trip(Frame::Resent {
            seq: 5,
            pages: vec![7; 4096],
        });
        round_trip(Frame::End);
        round_trip(Frame::Filter {
            ids: vec![1, u64::MAX],
            last: true,
        });
        round_trip(Frame::Ack { upto: 10 });
        round_trip(Frame::Resend { seq: 11 });
        round_trip(Frame::Reverse(vec![0; 3]));
        round_trip(Frame::Refused("no".into()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(
            Frame::decode(&[99, 0, 0, 0, 0]),
            Err(ProtocolError::UnknownType(99))
        );
        assert_eq!(
            Frame::decode(&[T_DATA, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(
            Frame::decode(&[T_REF, 0, 0, 0, 1, 0]),
            Err(ProtocolError::Malformed("ref"))
        );
        let mut hello = Vec::new();
        Frame::Hello {
            version: 9,
            session: 0,
            index: 0,
            deliver_to: String::new(),
        }
        .encode(&mut hello);
        assert_eq!(Frame::decode(&hello), Err(ProtocolError::Version(9)));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
