//! The decrypting side: a segment decoder shared by the sync and async
//! adapters, and the `std::io::Read` adapter.

use std::io::{self, BufRead, Read};

use zeroize::{Zeroize, Zeroizing};

use super::{Segments, StreamHeader, split_tag};
use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, StreamError};
use crate::format::secret::MasterKey;
use crate::format::suite::TAG_LEN;

enum State {
    /// Filling the ciphertext buffer / draining plaintext.
    Running,
    /// The final segment authenticated and was fully handed out or is
    /// being handed out.
    Done,
    /// A segment failed; every later read fails the same way.
    Failed(StreamError),
}

/// Reads segments into a ciphertext buffer and opens each into a plaintext
/// buffer. Sans-I/O: the adapters read into [`spare`](Self::spare) and
/// report with [`filled`](Self::filled).
///
/// A segment is final exactly when it is shorter than a full segment
/// (`segment_size + 16` bytes): every full segment is opened as non-final,
/// and the short piece at the end of the input as final. So a stream cut at
/// a segment boundary ends with no final segment ([`StreamError::Truncated`]),
/// and a stream cut inside, reordered, duplicated or extended fails a
/// segment's authentication ([`StreamError::Segment`]).
pub(crate) struct DecodeCore {
    header: StreamHeader,
    segments: Segments,
    /// One full sealed segment's worth of ciphertext.
    cbuf: Vec<u8>,
    filled: usize,
    /// The current segment's plaintext (`plain[pos..end]` not yet handed
    /// out), released only after it authenticated. Fixed length.
    plain: Zeroizing<Vec<u8>>,
    pos: usize,
    end: usize,
    /// Index of the next segment to open.
    index: u64,
    state: State,
}

impl DecodeCore {
    pub(crate) fn new(
        header: StreamHeader,
        master: &MasterKey,
        context: &EncryptionContext,
    ) -> Result<Self, CryptoError> {
        let segments = header.open(master, context)?;
        let size = segments.segment_size();
        Ok(DecodeCore {
            header,
            segments,
            cbuf: vec![0; size + TAG_LEN],
            filled: 0,
            plain: Zeroizing::new(vec![0; size]),
            pos: 0,
            end: 0,
            index: 0,
            state: State::Running,
        })
    }

    pub(crate) fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Authenticated plaintext not yet handed out.
    pub(crate) fn available(&self) -> &[u8] {
        self.plain.get(self.pos..self.end).unwrap_or_default()
    }

    /// `n` bytes of [`available`](Self::available) were handed out.
    pub(crate) fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.end);
    }

    /// Copies available plaintext into `out`.
    pub(crate) fn copy_out(&mut self, out: &mut [u8]) -> usize {
        let available = self.available();
        let n = available.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.consume(n);
        n
    }

    /// `Some(Ok(()))` at the clean end of the stream, `Some(Err)` after a
    /// failure, `None` while more input is needed.
    pub(crate) fn status(&self) -> Option<Result<(), StreamError>> {
        match &self.state {
            State::Running => None,
            State::Done => Some(Ok(())),
            State::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// What a `Read::read` into `out` returns without more input, if
    /// anything: plaintext already authenticated, the clean end, or the
    /// stream's failure. `None`: read more ciphertext.
    pub(crate) fn answer_without_input(&mut self, out: &mut [u8]) -> Option<io::Result<usize>> {
        if !self.available().is_empty() || out.is_empty() {
            return Some(Ok(self.copy_out(out)));
        }
        self.status()
            .map(|end| end.map(|()| 0).map_err(|e| CryptoError::Stream(e).into()))
    }

    /// Where the adapter reads the next ciphertext bytes into.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        self.cbuf.get_mut(self.filled..).unwrap_or_default()
    }

    /// The adapter read `n` bytes into [`spare`](Self::spare); `n == 0`
    /// means end of input. When this completes a segment, it is opened into
    /// `direct` if that is given and large enough (returning how many
    /// plaintext bytes went there: the caller's buffer, saving a copy), else
    /// into the decoder's own buffer ([`available`](Self::available)).
    pub(crate) fn filled(
        &mut self,
        n: usize,
        direct: Option<&mut [u8]>,
    ) -> Result<usize, StreamError> {
        if !matches!(self.state, State::Running) || !self.available().is_empty() {
            return self.status().unwrap_or(Ok(())).map(|()| 0);
        }
        if n == 0 {
            return self.open_segment(None, true, direct);
        }
        self.filled = self.filled.saturating_add(n).min(self.cbuf.len());
        if self.filled == self.cbuf.len() {
            return self.open_segment(None, false, direct);
        }
        Ok(0)
    }

    /// Length of a full sealed segment (segment size + tag).
    pub(crate) fn sealed_segment_len(&self) -> usize {
        self.cbuf.len()
    }

    /// Whether a borrowed segment may be opened now: running, nothing
    /// buffered, nothing left to hand out.
    pub(crate) fn ready_for_borrowed(&self) -> bool {
        matches!(self.state, State::Running) && self.filled == 0 && self.available().is_empty()
    }

    /// Opens one full (so non-final) sealed segment straight from the
    /// source's own buffer, saving the copy into ours. Only when
    /// [`ready_for_borrowed`](Self::ready_for_borrowed) and `sealed` is
    /// exactly [`sealed_segment_len`](Self::sealed_segment_len) long.
    /// Returns as [`filled`](Self::filled).
    pub(crate) fn open_borrowed(
        &mut self,
        sealed: &[u8],
        direct: Option<&mut [u8]>,
    ) -> Result<usize, StreamError> {
        if !self.ready_for_borrowed() || sealed.len() != self.cbuf.len() {
            return Err(StreamError::Segment { index: self.index });
        }
        self.open_segment(Some(sealed), false, direct)
    }

    fn open_segment(
        &mut self,
        borrowed: Option<&[u8]>,
        last: bool,
        direct: Option<&mut [u8]>,
    ) -> Result<usize, StreamError> {
        let index = self.index;
        let result = self.try_open(borrowed, index, last, direct);
        self.filled = 0;
        self.pos = 0;
        match result {
            Ok((direct, len)) => {
                self.end = if direct { 0 } else { len };
                self.index = index.saturating_add(1);
                if last {
                    self.state = State::Done;
                }
                Ok(if direct { len } else { 0 })
            }
            Err(e) => {
                self.end = 0;
                self.plain.zeroize();
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Opens the buffered (or `borrowed`) segment; returns (opened into
    /// `direct`, length).
    /// On failure the target was zeroized by `Segments::open`.
    fn try_open(
        &mut self,
        borrowed: Option<&[u8]>,
        index: u64,
        last: bool,
        direct: Option<&mut [u8]>,
    ) -> Result<(bool, usize), StreamError> {
        let segment = match borrowed {
            Some(sealed) => sealed,
            None => self.cbuf.get(..self.filled).unwrap_or_default(),
        };
        let Some((ciphertext, tag)) = split_tag(segment) else {
            // The input ended at a segment boundary or inside a tag: the
            // final segment is missing.
            return Err(StreamError::Truncated { segments: index });
        };
        let len = ciphertext.len();
        if let Some(out) = direct.and_then(|d| d.get_mut(..len)) {
            self.segments.open(index, last, ciphertext, tag, out)?;
            return Ok((true, len));
        }
        let out = self
            .plain
            .get_mut(..len)
            .ok_or(StreamError::Segment { index })?;
        self.segments.open(index, last, ciphertext, tag, out)?;
        Ok((false, len))
    }

    pub(crate) fn set_backend(&mut self, backend: crate::format::suite::Backend) {
        self.segments.set_backend(backend);
    }

    /// Bytes of memory the decoder holds for data: one sealed segment, one
    /// plaintext segment, the header.
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.cbuf.capacity() + self.plain.capacity() + self.header.as_bytes().len()
    }
}

/// Decrypts a stream from any [`Read`]: reads return plaintext segment by
/// segment, each only after it authenticated. At the end of the input a
/// missing final segment is an error, never a clean end of file.
///
/// Errors come as `io::Error` carrying a keyfold [`CryptoError`]
/// (`keyfold_core::Error::from(io_error)` gets it back): a truncation has
/// kind `UnexpectedEof`, a failed segment `InvalidData`.
///
/// **Do not act on plaintext from a stream that later fails**: read it to
/// the end first (or use [`stream::decrypt`](super::decrypt) into a
/// staging area).
///
/// ```
/// use std::io::Read;
/// use keyfold_core::{stream, EncryptionContext, CryptoError, MasterKey, SecretKey};
/// use keyfold_core::error::StreamError;
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new();
/// let options = stream::StreamOptions::default().segment_size(64);
/// let mut object = Vec::new();
/// stream::encrypt(&master, options, &ctx, &[1u8; 200][..], &mut object)?;
///
/// // The header names the version; a keyring would look it up.
/// let header = stream::StreamHeader::read(&mut &object[..])?;
/// assert_eq!(header.key_version(), master.version());
///
/// // Cut at a segment boundary: the final segment is missing.
/// let cut = &object[..111 + 2 * (64 + 16)];
/// let mut dec = stream::Decryptor::open(&master, &ctx, cut)?;
/// let err = dec.read_to_end(&mut Vec::new()).unwrap_err();
/// assert!(matches!(CryptoError::from(err), CryptoError::Stream(StreamError::Truncated { segments: 2 })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Decryptor<R: Read> {
    inner: R,
    core: DecodeCore,
}

impl<R: Read> std::fmt::Debug for Decryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decryptor")
            .field("header", self.core.header())
            .finish_non_exhaustive()
    }
}

impl<R: Read> Decryptor<R> {
    /// Decrypts the segments that follow `header` in `inner` (positioned
    /// just after the header). Opens the data key with `master` and checks
    /// the commitment before reading any segment.
    ///
    /// # Errors
    /// [`CryptoError::VersionMismatch`] when `master` is not the header's
    /// version, [`CryptoError::Decrypt`] for a wrong key or context or a modified
    /// header, [`CryptoError::Context`].
    pub fn new(
        header: StreamHeader,
        master: &MasterKey,
        context: &EncryptionContext,
        inner: R,
    ) -> Result<Self, CryptoError> {
        Ok(Decryptor {
            inner,
            core: DecodeCore::new(header, master, context)?,
        })
    }

    /// Reads the header from `inner`, then as [`new`](Self::new).
    ///
    /// # Errors
    /// As [`StreamHeader::read`] and [`new`](Self::new).
    pub fn open(
        master: &MasterKey,
        context: &EncryptionContext,
        mut inner: R,
    ) -> Result<Self, CryptoError> {
        let header = StreamHeader::read(&mut inner)?;
        Self::new(header, master, context, inner)
    }

    /// Opens the segments with `backend` (the result is the same whichever
    /// runs; default [`Backend::default`](crate::format::suite::Backend::default)).
    #[must_use]
    pub fn with_backend(mut self, backend: crate::format::suite::Backend) -> Self {
        self.core.set_backend(backend);
        self
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        self.core.header()
    }

    /// Bytes of buffer this decryptor holds (about two segments), constant
    /// for the stream's life whatever its size.
    pub fn buffered_capacity(&self) -> usize {
        self.core.buffered_capacity()
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Decrypts the rest of the stream into `writer`, handing it each
    /// segment's plaintext as soon as it authenticated (no intermediate
    /// copy). Returns the plaintext bytes written.
    pub(crate) fn write_to<W: io::Write>(&mut self, writer: &mut W) -> Result<u64, CryptoError> {
        let mut total = 0u64;
        loop {
            let available = self.core.available();
            if !available.is_empty() {
                writer.write_all(available)?;
                let n = available.len();
                self.core.consume(n);
                total = total.saturating_add(n as u64);
                continue;
            }
            match self.core.status() {
                Some(Ok(())) => return Ok(total),
                Some(Err(e)) => return Err(CryptoError::Stream(e)),
                None => {}
            }
            match self.inner.read(self.core.spare()) {
                Ok(n) => {
                    self.core.filled(n, None)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(answer) = self.core.answer_without_input(out) {
                return answer;
            }
            match self.inner.read(self.core.spare()) {
                Ok(n) => {
                    // A caller's buffer that holds a whole segment receives
                    // it directly, after it authenticated (no extra copy).
                    let direct = self
                        .core
                        .filled(n, Some(out))
                        .map_err(|e| io::Error::from(CryptoError::Stream(e)))?;
                    if direct > 0 {
                        return Ok(direct);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// [`Decryptor`] for a [`BufRead`] source: when the source's buffer holds a
/// whole sealed segment, the segment is opened straight out of that buffer,
/// with no copy into the decryptor's; and when the caller's buffer holds a
/// whole segment the plaintext goes straight there. Otherwise it works as
/// [`Decryptor`] does. An object in memory (`&[u8]`) or a memory map has
/// every segment borrowed. A `BufReader` refills only when empty, so its
/// buffer does not stay aligned with segments: give it a capacity of many
/// segments (with 64 KiB segments, 1 MiB has about 15 of 16 borrowed), not
/// just one.
/// Same checks, errors and caveats: **do not act on plaintext from a stream
/// that later fails**.
///
/// ```
/// use std::io::Read;
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "export-9");
/// let mut object = Vec::new();
/// stream::encrypt(&master, Default::default(), &ctx, &vec![7u8; 200_000][..], &mut object)?;
/// let mut plain = Vec::new();
/// stream::BufDecryptor::open(&master, &ctx, &object[..])?.read_to_end(&mut plain)?;
/// assert_eq!(plain, vec![7u8; 200_000]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct BufDecryptor<R: BufRead>(Decryptor<R>);

impl<R: BufRead> std::fmt::Debug for BufDecryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufDecryptor")
            .field("header", self.0.header())
            .finish_non_exhaustive()
    }
}

/// The same decoder and source as [`Decryptor`]; only `read` differs.
impl<R: BufRead> BufDecryptor<R> {
    /// As [`Decryptor::new`].
    ///
    /// # Errors
    /// As [`Decryptor::new`].
    pub fn new(
        header: StreamHeader,
        master: &MasterKey,
        context: &EncryptionContext,
        inner: R,
    ) -> Result<Self, CryptoError> {
        Decryptor::new(header, master, context, inner).map(BufDecryptor)
    }

    /// As [`Decryptor::open`].
    ///
    /// # Errors
    /// As [`Decryptor::open`].
    pub fn open(
        master: &MasterKey,
        context: &EncryptionContext,
        inner: R,
    ) -> Result<Self, CryptoError> {
        Decryptor::open(master, context, inner).map(BufDecryptor)
    }

    /// As [`Decryptor::with_backend`].
    #[must_use]
    pub fn with_backend(self, backend: crate::format::suite::Backend) -> Self {
        BufDecryptor(self.0.with_backend(backend))
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        self.0.header()
    }

    /// Bytes of buffer this decryptor holds, as [`Decryptor::buffered_capacity`].
    pub fn buffered_capacity(&self) -> usize {
        self.0.buffered_capacity()
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.0.into_inner()
    }
}

impl<R: BufRead> Read for BufDecryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let stream_err = |e| io::Error::from(CryptoError::Stream(e));
        loop {
            if let Some(answer) = self.0.core.answer_without_input(out) {
                return answer;
            }
            // Only `fill_buf` / `consume`, one call per step: the source's
            // buffer is the one place bytes come from.
            let buffered = match self.0.inner.fill_buf() {
                Ok(buffered) => buffered,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let full = self.0.core.sealed_segment_len();
            if self.0.core.ready_for_borrowed()
                && let Some(sealed) = buffered.get(..full)
            {
                // A whole segment is never the final one (that one is
                // shorter), so it can be opened without looking further.
                let direct = self
                    .0
                    .core
                    .open_borrowed(sealed, Some(&mut *out))
                    .map_err(stream_err)?;
                self.0.inner.consume(full);
                if direct > 0 {
                    return Ok(direct);
                }
                continue;
            }
            // Part of a segment (or the end, when nothing is buffered): into
            // our buffer, as `Decryptor` does.
            let spare = self.0.core.spare();
            let n = buffered.len().min(spare.len());
            if let (Some(dst), Some(src)) = (spare.get_mut(..n), buffered.get(..n)) {
                dst.copy_from_slice(src);
            }
            self.0.inner.consume(n);
            let direct = self.0.core.filled(n, Some(&mut *out)).map_err(stream_err)?;
            if direct > 0 {
                return Ok(direct);
            }
        }
    }
}
