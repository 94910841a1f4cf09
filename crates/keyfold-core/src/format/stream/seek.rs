//! Random access: decrypt byte ranges of a stream from a `Read + Seek`
//! source, reading only the segments a range needs.

use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;

use zeroize::Zeroizing;

use super::{MAX_SEGMENTS, Segments, StreamHeader, split_tag};
use crate::format::STREAM_HEADER_LEN;
use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, FormatError, StreamError};
use crate::format::secret::MasterKey;
use crate::format::suite::TAG_LEN;

/// Decrypts any byte range of a stream stored in a `Read + Seek` source
/// (a file, an object-store range reader), reading only the header, the
/// final segment (once, when opened: it authenticates the length) and the
/// segments the range covers. Also implements [`Read`] and [`Seek`] over the
/// plaintext.
///
/// The layout follows from the source's length alone: every segment but
/// the last holds `segment_size + 16` bytes, so segment `i` starts at
/// `111 + i * (segment_size + 16)`. Every segment read is authenticated
/// with its index and final flag, so a segment moved, duplicated or from
/// another object is rejected, and a cut object fails when opened.
///
/// ```
/// use std::io::Cursor;
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "video");
/// let plain: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
/// let mut object = Vec::new();
/// let options = stream::StreamOptions::default().segment_size(4096);
/// stream::encrypt(&master, options, &ctx, &plain[..], &mut object)?;
///
/// let mut source = Cursor::new(object);
/// let header = stream::StreamHeader::read(&mut source)?;
/// let mut seek = stream::SeekDecryptor::new(header, &master, &ctx, source)?;
/// assert_eq!(seek.plaintext_len(), 100_000);
/// assert_eq!(seek.read_range(50_000..50_010)?, &plain[50_000..50_010]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SeekDecryptor<R: Read + Seek> {
    inner: R,
    header: StreamHeader,
    segments: Segments,
    /// Bytes of a full sealed segment.
    full: u64,
    count: u64,
    last_len: u64,
    plaintext_len: u64,
    cbuf: Vec<u8>,
    /// Plaintext of segment `cached`.
    plain: Zeroizing<Vec<u8>>,
    cached: Option<u64>,
    segments_read: u64,
    pos: u64,
}

impl<R: Read + Seek> std::fmt::Debug for SeekDecryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeekDecryptor")
            .field("header", &self.header)
            .field("plaintext_len", &self.plaintext_len)
            .finish_non_exhaustive()
    }
}

impl<R: Read + Seek> SeekDecryptor<R> {
    /// Opens the stream whose header is `header` and which `inner` holds
    /// from offset 0. Opens the data key under `master` (checking the
    /// commitment), computes the layout from the source's length and
    /// authenticates the final segment.
    ///
    /// # Errors
    /// As [`Decryptor::new`](super::Decryptor::new), and
    /// [`StreamError::Truncated`] / [`StreamError::Segment`] when the final
    /// segment is missing or fails; [`CryptoError::Io`].
    pub fn new(
        header: StreamHeader,
        master: &MasterKey,
        context: &EncryptionContext,
        mut inner: R,
    ) -> Result<Self, CryptoError> {
        let segments = header.open(master, context)?;
        let seg = segments.segment_size() as u64;
        let full = seg + TAG_LEN as u64;
        let total = inner.seek(SeekFrom::End(0))?;
        let body = total
            .checked_sub(STREAM_HEADER_LEN as u64)
            .ok_or(FormatError::TooShort {
                what: "stream header",
                needed: STREAM_HEADER_LEN,
                got: usize::try_from(total).unwrap_or(usize::MAX),
            })?;
        // Every segment but the last is full; the last is shorter.
        let full_segments = body / full;
        let last_len = body % full;
        let count = full_segments.saturating_add(1);
        if count > MAX_SEGMENTS {
            return Err(StreamError::TooLong { max: MAX_SEGMENTS }.into());
        }
        if last_len < TAG_LEN as u64 {
            return Err(StreamError::Truncated {
                segments: full_segments,
            }
            .into());
        }
        let plaintext_len = full_segments * seg + (last_len - TAG_LEN as u64);
        let mut this = SeekDecryptor {
            inner,
            header,
            cbuf: vec![0; segments.segment_size() + TAG_LEN],
            plain: Zeroizing::new(Vec::with_capacity(segments.segment_size())),
            segments,
            full,
            count,
            last_len,
            plaintext_len,
            cached: None,
            segments_read: 0,
            pos: 0,
        };
        // Authenticate the length: the final segment must open as final.
        this.load(count - 1)?;
        Ok(this)
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The plaintext length (authenticated: the final segment opened).
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Segments read from the source so far (including the final one, read
    /// when opened).
    pub fn segments_read(&self) -> u64 {
        self.segments_read
    }

    /// Bytes of buffer held (about two segments).
    pub fn buffered_capacity(&self) -> usize {
        self.cbuf.capacity() + self.plain.capacity()
    }

    /// The inner source.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads and authenticates segment `index` into `plain`.
    fn load(&mut self, index: u64) -> Result<(), CryptoError> {
        if self.cached == Some(index) {
            return Ok(());
        }
        self.cached = None;
        let last = index + 1 == self.count;
        let len = if last { self.last_len } else { self.full };
        let len = usize::try_from(len).map_err(|_| StreamError::Segment { index })?;
        let offset = (STREAM_HEADER_LEN as u64).saturating_add(index.saturating_mul(self.full));
        self.inner.seek(SeekFrom::Start(offset))?;
        let buf = self
            .cbuf
            .get_mut(..len)
            .ok_or(StreamError::Segment { index })?;
        self.segments_read += 1;
        if let Err(e) = self.inner.read_exact(buf) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                // The source shrank since it was opened.
                StreamError::Truncated { segments: index }.into()
            } else {
                e.into()
            });
        }
        let (ciphertext, tag) = split_tag(buf).ok_or(StreamError::Segment { index })?;
        self.plain.clear();
        self.plain.resize(ciphertext.len(), 0);
        self.segments
            .open(index, last, ciphertext, tag, &mut self.plain)?;
        self.cached = Some(index);
        Ok(())
    }

    /// Reads plaintext at `offset` into `out`, up to `out.len()` bytes
    /// across segments; returns how many (0 at or past the end).
    ///
    /// # Errors
    /// [`StreamError::Segment`] when a segment read fails to authenticate,
    /// [`CryptoError::Io`].
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<usize, CryptoError> {
        let seg = self.segments.segment_size() as u64;
        let mut done = 0usize;
        let mut offset = offset;
        while done < out.len() && offset < self.plaintext_len {
            let index = offset / seg;
            self.load(index)?;
            let within = usize::try_from(offset % seg).unwrap_or(usize::MAX);
            let src = self.plain.get(within..).unwrap_or_default();
            let dst = out.get_mut(done..).unwrap_or_default();
            let n = src.len().min(dst.len());
            if n == 0 {
                break;
            }
            if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
                d.copy_from_slice(s);
            }
            done += n;
            offset += n as u64;
        }
        Ok(done)
    }

    /// Exactly the plaintext bytes of `range`.
    ///
    /// # Errors
    /// [`StreamError::Range`] when the range is reversed or ends past the
    /// plaintext; as [`read_at`](Self::read_at).
    pub fn read_range(&mut self, range: Range<u64>) -> Result<Vec<u8>, CryptoError> {
        if range.start > range.end || range.end > self.plaintext_len {
            return Err(StreamError::Range {
                start: range.start,
                end: range.end,
                len: self.plaintext_len,
            }
            .into());
        }
        let len = usize::try_from(range.end - range.start).map_err(|_| StreamError::Range {
            start: range.start,
            end: range.end,
            len: self.plaintext_len,
        })?;
        let mut out = vec![0; len];
        let n = self.read_at(range.start, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

impl<R: Read + Seek> Read for SeekDecryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, out)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for SeekDecryptor<R> {
    /// Moves within the plaintext (no I/O).
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.plaintext_len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the plaintext",
            )
        })?;
        Ok(self.pos)
    }
}
