//! The encrypting side: a segment encoder shared by the sync and async
//! adapters, and the `std::io::Write` adapter.

use std::io::{self, Read, Write};

use zeroize::Zeroizing;

use super::{Segments, StreamHeader, StreamOptions, fresh_header};
use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, StreamError};
use crate::format::secret::MasterKey;
use crate::format::suite::TAG_LEN;

/// Collects plaintext into one segment buffer, seals it in place when it is
/// full, and hands out the bytes to write (header first). Sans-I/O: the
/// adapters drive it.
///
/// A segment is sealed as soon as it holds `segment_size` bytes, so the
/// final segment always holds fewer (0 to `segment_size - 1`): a reader
/// knows a segment is final from its length alone (docs/FORMAT.md,
/// "Streaming").
pub(crate) struct EncodeCore {
    header: StreamHeader,
    header_pos: usize,
    segments: Segments,
    /// `buf[..len]`: plaintext being collected, or a sealed segment
    /// (ciphertext ‖ tag) being written out. Fixed length (one segment and
    /// its tag): never reallocated, so no copy of plaintext is left behind.
    buf: Zeroizing<Vec<u8>>,
    len: usize,
    /// `buf[..len]` is a sealed segment; `out_pos` of it are written.
    sealed: bool,
    out_pos: usize,
    /// Index of the segment being collected.
    index: u64,
    /// The final segment was sealed.
    finished: bool,
    plaintext_len: u64,
}

impl EncodeCore {
    pub(crate) fn new(
        master: &MasterKey,
        options: StreamOptions,
        context: &EncryptionContext,
    ) -> Result<Self, CryptoError> {
        let (header, segments) = fresh_header(master, options, context)?;
        Ok(Self::from_parts(header, segments))
    }

    pub(crate) fn from_parts(header: StreamHeader, segments: Segments) -> Self {
        let capacity = segments.segment_size() + TAG_LEN;
        EncodeCore {
            header,
            header_pos: 0,
            segments,
            buf: Zeroizing::new(vec![0; capacity]),
            len: 0,
            sealed: false,
            out_pos: 0,
            index: 0,
            finished: false,
            plaintext_len: 0,
        }
    }

    pub(crate) fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes waiting to be written to the inner writer.
    pub(crate) fn pending(&self) -> &[u8] {
        if let Some(rest) = self.header.as_bytes().get(self.header_pos..)
            && !rest.is_empty()
        {
            return rest;
        }
        if self.sealed {
            self.buf.get(self.out_pos..self.len).unwrap_or_default()
        } else {
            &[]
        }
    }

    /// `n` bytes of [`pending`](Self::pending) were written.
    pub(crate) fn advance(&mut self, n: usize) {
        if self.header_pos < self.header.as_bytes().len() {
            self.header_pos = self.header_pos.saturating_add(n);
            return;
        }
        self.out_pos = self.out_pos.saturating_add(n);
        if self.sealed && self.out_pos >= self.len {
            self.len = 0;
            self.sealed = false;
            self.out_pos = 0;
        }
    }

    /// Takes plaintext from `data` into the segment buffer; seals the
    /// segment when it is full. Returns how many bytes were taken: 0 only
    /// when output is pending (drain it first) or `data` is empty.
    pub(crate) fn accept(&mut self, data: &[u8]) -> Result<usize, CryptoError> {
        if self.finished {
            return Err(StreamError::Finished.into());
        }
        let size = self.segments.segment_size();
        if self.len == 0
            && !self.sealed
            && let Some(whole) = data.get(..size)
        {
            // A whole segment in the caller's buffer: seal it from there
            // into ours, saving the copy in.
            self.seal_whole(whole)?;
            self.plaintext_len = self.plaintext_len.saturating_add(size as u64);
            return Ok(size);
        }
        // Plaintext may be collected while the header is still pending.
        let room = self.room();
        let take = room.len().min(data.len());
        if let (Some(dst), Some(src)) = (room.get_mut(..take), data.get(..take)) {
            dst.copy_from_slice(src);
        }
        self.filled(take)?;
        Ok(take)
    }

    /// Where plaintext can be put directly (e.g. read from a source): the
    /// free part of the segment buffer; empty while output is pending.
    pub(crate) fn room(&mut self) -> &mut [u8] {
        if self.sealed || self.finished {
            return &mut [];
        }
        let end = self.segments.segment_size();
        self.buf.get_mut(self.len..end).unwrap_or_default()
    }

    /// `n` bytes were put into [`room`](Self::room); seals the segment
    /// when it is full.
    pub(crate) fn filled(&mut self, n: usize) -> Result<(), CryptoError> {
        if self.sealed {
            return Ok(());
        }
        self.len = self.len.saturating_add(n).min(self.segments.segment_size());
        self.plaintext_len = self.plaintext_len.saturating_add(n as u64);
        if self.len == self.segments.segment_size() {
            self.seal(false)?;
        }
        Ok(())
    }

    /// Seals the collected plaintext as the final segment.
    pub(crate) fn finish(&mut self) -> Result<(), CryptoError> {
        if self.finished {
            return Ok(());
        }
        if self.sealed {
            // Cannot happen: a full segment is sealed, and the adapters
            // drain it before finishing.
            return Err(StreamError::Finished.into());
        }
        self.seal(true)
    }

    /// Seals `plaintext`, a whole segment (so not the final one), from the
    /// caller's buffer into ours.
    fn seal_whole(&mut self, plaintext: &[u8]) -> Result<(), CryptoError> {
        self.check_counter(false)?;
        let (out, rest) = self
            .buf
            .split_at_mut_checked(plaintext.len())
            .ok_or(CryptoError::Encrypt)?;
        let tag = self.segments.seal_from(self.index, false, plaintext, out)?;
        rest.get_mut(..TAG_LEN)
            .ok_or(CryptoError::Encrypt)?
            .copy_from_slice(&tag);
        self.len = plaintext.len() + TAG_LEN;
        self.sealed = true;
        self.out_pos = 0;
        self.index = self.index.saturating_add(1);
        Ok(())
    }

    fn check_counter(&self, last: bool) -> Result<(), CryptoError> {
        if !last && self.index >= super::MAX_SEGMENTS - 1 {
            // The final segment would have no counter left.
            return Err(StreamError::TooLong {
                max: super::MAX_SEGMENTS,
            }
            .into());
        }
        Ok(())
    }

    fn seal(&mut self, last: bool) -> Result<(), CryptoError> {
        self.check_counter(last)?;
        let (plaintext, rest) = self
            .buf
            .split_at_mut_checked(self.len)
            .ok_or(CryptoError::Encrypt)?;
        let tag = self.segments.seal(self.index, last, plaintext)?;
        rest.get_mut(..TAG_LEN)
            .ok_or(CryptoError::Encrypt)?
            .copy_from_slice(&tag);
        self.len += TAG_LEN;
        self.sealed = true;
        self.out_pos = 0;
        self.index = self.index.saturating_add(1);
        self.finished = last;
        Ok(())
    }

    /// The final segment was sealed (it may still be pending output).
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    pub(crate) fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Bytes of memory the encoder holds for data (buffer capacity and header).
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.buf.len() + self.header.as_bytes().len()
    }
}

/// Encrypts a stream into any [`Write`]: write plaintext to it, then call
/// [`finish`](Self::finish). Holds one segment (plus its tag) in memory.
///
/// Dropping it without `finish` leaves a stream without its final segment,
/// which every reader rejects as truncated.
///
/// ```
/// use std::io::Write;
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "log-2026-11");
/// let options = stream::StreamOptions::default().segment_size(1024);
/// let mut enc = stream::Encryptor::new(&master, options, &ctx, Vec::new())?;
/// for line in 0..100 {
///     writeln!(enc, "line {line}")?;
/// }
/// let object: Vec<u8> = enc.finish()?;
/// assert_eq!(stream::StreamHeader::parse(&object)?.key_version(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Encryptor<W: Write> {
    inner: W,
    core: EncodeCore,
}

impl<W: Write> std::fmt::Debug for Encryptor<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryptor")
            .field("header", self.core.header())
            .field("plaintext_len", &self.core.plaintext_len())
            .finish_non_exhaustive()
    }
}

impl<W: Write> Encryptor<W> {
    /// Starts a stream under `master`, bound to `context`, with a fresh data
    /// key. The header goes out on the first write (or in
    /// [`finish`](Self::finish)).
    ///
    /// # Errors
    /// [`StreamError::SegmentSize`], [`CryptoError::Context`], [`CryptoError::Rng`].
    pub fn new(
        master: &MasterKey,
        options: StreamOptions,
        context: &EncryptionContext,
        inner: W,
    ) -> Result<Self, CryptoError> {
        Ok(Encryptor {
            inner,
            core: EncodeCore::new(master, options, context)?,
        })
    }

    /// The stream's header (it names the master key version).
    pub fn header(&self) -> &StreamHeader {
        self.core.header()
    }

    /// Bytes of buffer this encryptor holds: one segment plus its tag, and
    /// the header. Constant for the stream's life, whatever its size.
    pub fn buffered_capacity(&self) -> usize {
        self.core.buffered_capacity()
    }

    /// Seals the final segment, writes everything out, flushes and returns
    /// the inner writer.
    ///
    /// # Errors
    /// [`CryptoError::Io`] when writing fails (the stream is then incomplete).
    pub fn finish(mut self) -> Result<W, CryptoError> {
        self.drain()?;
        if !self.core.is_finished() {
            self.core.finish()?;
        }
        self.drain()?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    /// Reads plaintext from `reader` straight into the segment buffer;
    /// returns the bytes read (0 at the end of `reader`).
    pub(crate) fn fill_from<R: Read>(&mut self, reader: &mut R) -> Result<usize, CryptoError> {
        loop {
            self.drain()?;
            match reader.read(self.core.room()) {
                Ok(n) => {
                    self.core.filled(n)?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`finish`](Self::finish), returning the plaintext length instead.
    pub(crate) fn finish_len(self) -> Result<u64, CryptoError> {
        let len = self.core.plaintext_len();
        self.finish()?;
        Ok(len)
    }

    fn drain(&mut self) -> io::Result<()> {
        loop {
            let pending = self.core.pending();
            if pending.is_empty() {
                return Ok(());
            }
            match self.inner.write(pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.core.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        loop {
            self.drain()?;
            let n = self.core.accept(data)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Writes out sealed segments and flushes the inner writer. A partial
    /// segment stays buffered until it is full or the stream is finished.
    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.inner.flush()
    }
}
