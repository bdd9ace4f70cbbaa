//! A read cursor over a byte slice that answers "not enough bytes yet" instead of failing, so a
//! parser can stop at any point of a partial read and resume once more bytes arrived.

pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    pub fn peek_u8(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub fn be16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }

    pub fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }

    pub fn be64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.take(N)?;
        Some(s.try_into().expect("length checked"))
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.remaining() < n {
            return None;
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Some(s)
    }

    /// A string with a one-byte length in front (QEMU's idstr encoding).
    pub fn short_str(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_answer_none_and_do_not_move_past_the_end() {
        let mut c = Cursor::new(&[0, 1, 2]);
        assert_eq!(c.be16(), Some(1));
        assert_eq!(c.be32(), None);
        assert_eq!(c.u8(), Some(2));
        assert_eq!(c.u8(), None);
        assert_eq!(c.remaining(), 0);
    }

    #[test]
    fn short_strings_are_length_prefixed() {
        let mut c = Cursor::new(b"\x03ramx");
        assert_eq!(c.short_str(), Some(&b"ram"[..]));
        assert_eq!(c.pos(), 4);
        let mut c = Cursor::new(b"\x05ram");
        assert_eq!(c.short_str(), None);
    }
}
