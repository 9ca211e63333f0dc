//! The big-endian primitives every frame is made of: [`Reader`] takes fields
//! off a body without ever panicking, and the `put_*` helpers with
//! [`begin`]/[`end`] append them and frame them with a length prefix.
//!
//! Internal to the codec: `decode`, `encode` and the list entries build on
//! these, and nothing here knows about any particular frame type.

use byteorder::{BigEndian, ByteOrder};

use crate::protocol::error::DecodeError;
use crate::protocol::limits::MAX_PAYLOAD;
use crate::protocol::MAGIC;

/// Bytes before the body: the `u32` length and the `u8` type.
pub const HEADER_LEN: usize = 5;

// ---------------------------------------------------------------- reading

/// Reads big-endian fields from a body, never panicking. Internal to the codec.
#[doc(hidden)]
pub struct Reader<'a> {
    pub(super) b: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline]
    pub(super) fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }

    #[inline]
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    #[inline]
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    #[inline]
    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.take(2, field)?))
    }
    #[inline]
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.take(4, field)?))
    }
    #[inline]
    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(BigEndian::read_i32(self.take(4, field)?))
    }
    #[inline]
    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.take(8, field)?))
    }
    #[inline]
    pub(super) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    #[inline]
    /// A request's `version` byte (protocol.md §7): one this implementation
    /// does not speak ends the decoding there, whatever follows, because the
    /// rest of the body may have another version's layout.
    pub(super) fn version(&mut self) -> Result<u8, DecodeError> {
        let v = self.u8("version")?;
        if !crate::protocol::speaks(v) {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        Ok(v)
    }

    pub(super) fn magic(&mut self) -> Result<(), DecodeError> {
        let m = self.u32("magic")?;
        if m != MAGIC {
            return Err(DecodeError::BadMagic(m));
        }
        Ok(())
    }
    #[inline]
    pub(super) fn checked(
        &mut self,
        len: usize,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        if len < min || len > max {
            return Err(DecodeError::BadLength { field, len });
        }
        self.take(len, field)
    }
    #[inline]
    pub(super) fn str8(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let n = self.u8(field)? as usize;
        self.checked(n, field, min, max)
    }
    #[inline]
    pub(super) fn str16(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let n = self.u16(field)? as usize;
        self.checked(n, field, min, max)
    }
    #[inline]
    pub(super) fn str32(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.checked(n, field, min, max)
    }
    /// The rest of the body as a payload, checked against [`MAX_PAYLOAD`].
    #[inline]
    pub(super) fn payload(&mut self) -> Result<&'a [u8], DecodeError> {
        let p = std::mem::take(&mut self.b);
        if p.len() > MAX_PAYLOAD {
            return Err(DecodeError::BadLength { field: "payload", len: p.len() });
        }
        Ok(p)
    }
    #[inline]
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { extra: self.b.len() })
        }
    }
}

// ---------------------------------------------------------------- writing

#[inline]
pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
#[inline]
pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
#[inline]
pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Writes a u8-length-prefixed field. Callers keep fields within limits;
/// an over-long field is cut at 255 bytes rather than corrupting the frame.
#[inline]
pub(super) fn put_str8(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}
#[inline]
pub(super) fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(65535)];
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s);
}

/// Starts a frame of type `t` in `out`; returns the offset of its length field.
#[inline]
pub(super) fn begin(out: &mut Vec<u8>, t: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, t]);
    at
}

/// Fills in the length field of the frame started at `at`.
#[inline]
pub(super) fn end(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    BigEndian::write_u32(&mut out[at..at + 4], len);
}
