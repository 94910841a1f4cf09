//! Streaming encryption of large objects in bounded memory
//! (docs/FORMAT.md, "Streaming").
//!
//! An object is encrypted under a fresh data key, wrapped under a master key
//! version exactly as a record's is, in a 111-byte header of the same family
//! as the record format (suite ids 0x81 and 0x82). The payload is cut into
//! segments of a fixed plaintext size (default 64 KiB, recorded in the
//! header), each sealed with the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway, Vizár, CRYPTO 2015): the nonce of segment `i` is
//! `nonce_prefix ‖ i ‖ last_flag`, so truncation, reordering, duplication
//! and appended data are all detected.
//!
//! - [`Encryptor`] is a [`std::io::Write`] adapter, [`Decryptor`] a
//!   [`std::io::Read`] adapter; with the `async-io` feature,
//!   `AsyncEncryptor` / `AsyncDecryptor` adapt `tokio::io::AsyncWrite` /
//!   `AsyncRead`. Each holds at most about two segments in memory, whatever
//!   the object's size.
//! - [`SeekDecryptor`] decrypts byte ranges of a `Read + Seek` source,
//!   reading only the segments a range needs.
//! - Rotation: [`record::rewrap_header_in_place`](crate::format::record::rewrap_header_in_place)
//!   rewraps the header alone (of a stream or a record); [`rewrap_in_place`]
//!   does it on a `Read + Write + Seek` object. Re-encryption ([`reencrypt`])
//!   streams too.
//!
//! **Plaintext is released segment by segment**, each only after it
//! authenticated. A stream can still fail later (a later segment modified,
//! or the object cut short): **a caller must not act on data read from a
//! stream until the stream has been read to its end without error.** A
//! truncated stream is reported at its end as
//! [`StreamError::Truncated`] or
//! [`StreamError::Segment`], never as a
//! clean end of file.
//!
//! ```
//! use std::io::{Read, Write};
//! use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
//!
//! let master = MasterKey::new(1, SecretKey::generate()?);
//! let ctx = EncryptionContext::new().with("tenant", "acme").with("object", "backup-42");
//!
//! let mut enc = stream::Encryptor::new(&master, stream::StreamOptions::default(), &ctx, Vec::new())?;
//! enc.write_all(b"gigabytes, in principle")?;
//! let object = enc.finish()?;
//!
//! let mut dec = stream::Decryptor::open(&master, &ctx, &object[..])?;
//! let mut plain = Vec::new();
//! dec.read_to_end(&mut plain)?;
//! assert_eq!(plain, b"gigabytes, in principle");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With a keyring, the header names the master key version to fetch:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keyfold_core::{stream, Actor, EncryptionContext, Keyring, LocalKek, MemoryStore, SecretKey};
//! let kek = Arc::new(LocalKek::from_bytes("kek", SecretKey::generate()?));
//! let ring = Keyring::builder("tenant-1", kek, Arc::new(MemoryStore::new())).create().await?;
//! ring.rotate(&Actor::new("admin")).await?;
//! let ctx = EncryptionContext::new().with("object", "export.csv");
//!
//! // `active_key`, not `master_key(active_version())`: it reloads a view
//! // older than the max staleness, so a stale instance never encrypts
//! // under a version another instance retired.
//! let active = ring.active_key().await?;
//! let mut object = Vec::new();
//! stream::encrypt(&active, Default::default(), &ctx, &b"rows..."[..], &mut object)?;
//!
//! let mut source = &object[..];
//! let header = stream::StreamHeader::read(&mut source)?;
//! let key = ring.master_key(header.key_version()).await?;
//! let mut plain = Vec::new();
//! std::io::copy(&mut stream::Decryptor::new(header, &key, &ctx, source)?, &mut plain)?;
//! assert_eq!(plain, b"rows...");
//! # Ok(()) }
//! ```

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use zeroize::Zeroizing;

use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, FormatError, StreamError};
use crate::format::kdf;
use crate::format::record::{commitment, open_committed, with_context, write_wrap};
use crate::format::rng;
use crate::format::secret::{KEY_LEN, MasterKey};
use crate::format::suite::{self, Backend, Suite, TAG_LEN};
use crate::format::{
    DEFAULT_SEGMENT_SIZE, FORMAT_V1, HeaderKind, HeaderView, MAGIC, MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE, NONCE_PREFIX_LEN, STREAM_HEADER_LEN, STREAM_IMMUTABLE_END, WRAP_NONCE_LEN,
    stream_suite_id,
};

mod read;
mod seek;
#[cfg(feature = "async-io")]
mod tokio_io;
#[cfg(test)]
mod vectors;
mod write;

pub use read::{BufDecryptor, Decryptor};
pub use seek::SeekDecryptor;
#[cfg(feature = "async-io")]
pub use tokio_io::{AsyncDecryptor, AsyncEncryptor};
pub use write::Encryptor;

/// KDF label of the segment key (docs/FORMAT.md, "Streaming").
const LABEL_STREAM_KEY: &[u8] = b"keyfold1 stream";

/// Most segments a stream may have: the segment counter is 32 bits.
pub const MAX_SEGMENTS: u64 = 1 << 32;

/// Bytes a stream adds per segment: the AEAD tag.
pub const SEGMENT_OVERHEAD: usize = TAG_LEN;

/// How to encrypt a stream: suite and segment size.
///
/// ```
/// # use keyfold_core::{stream::StreamOptions, Suite};
/// let options = StreamOptions::default()
///     .suite(Suite::ChaCha20Poly1305)
///     .segment_size(1 << 20);
/// assert_eq!(options.get_segment_size(), 1 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    suite: Suite,
    segment_size: u32,
    backend: Backend,
}

impl Default for StreamOptions {
    /// The default suite (AES-256-GCM) and 64 KiB segments.
    fn default() -> Self {
        StreamOptions {
            suite: Suite::default(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            backend: Backend::default(),
        }
    }
}

impl StreamOptions {
    /// The AEAD suite; the header records it as 0x80 | its record id.
    #[must_use]
    pub fn suite(mut self, suite: Suite) -> Self {
        self.suite = suite;
        self
    }

    /// Plaintext bytes per segment, from
    /// [`MIN_SEGMENT_SIZE`] to
    /// [`MAX_SEGMENT_SIZE`] (checked when
    /// the stream is created). Memory use is about twice this.
    #[must_use]
    pub fn segment_size(mut self, segment_size: u32) -> Self {
        self.segment_size = segment_size;
        self
    }

    /// Which AEAD implementation seals the segments (the output is the
    /// same whichever runs; default [`Backend::default`]).
    #[must_use]
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The chosen suite.
    pub fn get_suite(&self) -> Suite {
        self.suite
    }

    /// The chosen segment size.
    pub fn get_segment_size(&self) -> u32 {
        self.segment_size
    }
}

fn check_segment_size(size: u32) -> Result<(), StreamError> {
    if (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(StreamError::SegmentSize {
            size,
            min: MIN_SEGMENT_SIZE,
            max: MAX_SEGMENT_SIZE,
        })
    }
}

/// A stream's 111-byte header, parsed: readable without any key, so the
/// caller can pick the master key version it names.
///
/// ```
/// # use keyfold_core::{stream::{self, StreamHeader}, EncryptionContext, MasterKey, SecretKey};
/// let master = MasterKey::new(4, SecretKey::generate()?);
/// let mut object = Vec::new();
/// stream::encrypt(&master, Default::default(), &EncryptionContext::new(), &b"data"[..], &mut object)?;
/// let header = StreamHeader::parse(&object)?;
/// assert_eq!(header.key_version(), 4);
/// assert_eq!(header.segment_size(), 64 * 1024);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct StreamHeader {
    bytes: [u8; STREAM_HEADER_LEN],
    suite: Suite,
    segment_size: u32,
    version: u32,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl fmt::Debug for StreamHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamHeader")
            .field("suite", &self.suite)
            .field("key_version", &self.version)
            .field("segment_size", &self.segment_size)
            .finish_non_exhaustive()
    }
}

impl StreamHeader {
    /// Parses the stream header at the start of `bytes` (bytes after it are
    /// ignored).
    ///
    /// # Errors
    /// [`CryptoError::Format`] for a malformed or short header, or a record header
    /// ([`FormatError::UnknownSuite`]); [`StreamError::SegmentSize`] for a
    /// segment size out of bounds.
    pub fn parse(bytes: &[u8]) -> Result<Self, CryptoError> {
        let view = HeaderView::parse_prefix(bytes)?;
        if view.kind != HeaderKind::Stream {
            return Err(FormatError::UnknownSuite(view.suite_id).into());
        }
        check_segment_size(view.segment_size)?;
        let array: [u8; STREAM_HEADER_LEN] =
            view.bytes.try_into().map_err(|_| FormatError::TooShort {
                what: "stream header",
                needed: STREAM_HEADER_LEN,
                got: view.bytes.len(),
            })?;
        Ok(StreamHeader {
            bytes: array,
            suite: view.suite,
            segment_size: view.segment_size,
            version: view.version,
            nonce_prefix: view.nonce_prefix,
        })
    }

    /// Reads exactly the header from `reader`.
    ///
    /// # Errors
    /// As [`parse`](Self::parse); a source shorter than a header is
    /// [`FormatError::TooShort`]; other read failures are [`CryptoError::Io`].
    pub fn read<R: Read>(reader: &mut R) -> Result<Self, CryptoError> {
        let mut bytes = [0u8; STREAM_HEADER_LEN];
        let got = read_full(reader, &mut bytes)?;
        Self::parse_read(&bytes, got)
    }

    /// Parses a header buffer of which a reader filled the first `got`
    /// bytes; short of a whole header, the most precise error for what is
    /// there.
    pub(crate) fn parse_read(
        bytes: &[u8; STREAM_HEADER_LEN],
        got: usize,
    ) -> Result<Self, CryptoError> {
        if got < STREAM_HEADER_LEN {
            return Err(Self::parse(bytes.get(..got).unwrap_or_default())
                .err()
                .unwrap_or(CryptoError::Format(FormatError::TooShort {
                    what: "stream header",
                    needed: STREAM_HEADER_LEN,
                    got,
                })));
        }
        Self::parse(bytes)
    }

    /// The header's bytes, as stored at the start of the object.
    pub fn as_bytes(&self) -> &[u8; STREAM_HEADER_LEN] {
        &self.bytes
    }

    /// The master key version that wrapped the data key.
    pub fn key_version(&self) -> u32 {
        self.version
    }

    /// The AEAD suite.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Plaintext bytes per segment.
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    fn view(&self) -> Result<HeaderView<'_>, CryptoError> {
        Ok(HeaderView::parse_prefix(&self.bytes)?)
    }

    /// Opens the data key under `master` (checking the commitment) and
    /// derives the segment state.
    fn open(
        &self,
        master: &MasterKey,
        context: &EncryptionContext,
    ) -> Result<Segments, CryptoError> {
        let context = context.encode()?;
        let data_key = open_committed(&self.view()?, master, &context)?;
        Ok(Segments::new(&data_key, self, &context))
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, CryptoError> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Builds a stream header and its segment state from chosen secrets: the
/// deterministic core of [`Encryptor::new`], for known-answer vectors.
pub(crate) fn seal_header(
    master: &MasterKey,
    suite: Suite,
    segment_size: u32,
    context: &[u8],
    data_key: &[u8; KEY_LEN],
    wrap_nonce: &[u8; WRAP_NONCE_LEN],
    nonce_prefix: &[u8; NONCE_PREFIX_LEN],
) -> Result<(StreamHeader, Segments), CryptoError> {
    check_segment_size(segment_size)?;
    let suite_id = stream_suite_id(suite);
    let mut header = Vec::with_capacity(STREAM_HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.push(FORMAT_V1);
    header.push(suite_id);
    header.extend_from_slice(&*commitment(data_key, HeaderKind::Stream, suite_id));
    header.extend_from_slice(&segment_size.to_be_bytes());
    header.extend_from_slice(nonce_prefix);
    header.resize(STREAM_HEADER_LEN, 0);
    write_wrap(&mut header, master, data_key, wrap_nonce, context)?;
    let header = StreamHeader::parse(&header)?;
    let segments = Segments::new(data_key, &header, context);
    Ok((header, segments))
}

/// A fresh header for a new stream: random data key, wrap nonce and nonce
/// prefix from the OS generator.
fn fresh_header(
    master: &MasterKey,
    options: StreamOptions,
    context: &EncryptionContext,
) -> Result<(StreamHeader, Segments), CryptoError> {
    let context = context.encode()?;
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    rng::fill(&mut *data_key)?;
    let mut wrap_nonce = [0u8; WRAP_NONCE_LEN];
    rng::fill(&mut wrap_nonce)?;
    let mut prefix = [0u8; NONCE_PREFIX_LEN];
    rng::fill(&mut prefix)?;
    let (header, mut segments) = seal_header(
        master,
        options.suite,
        options.segment_size,
        &context,
        &data_key,
        &wrap_nonce,
        &prefix,
    )?;
    segments.set_backend(options.backend);
    Ok((header, segments))
}

/// The per-object segment AEAD: segment key, nonce prefix and the AAD
/// (immutable header ‖ context) shared by every segment
/// (docs/FORMAT.md, "Streaming").
pub(crate) struct Segments {
    backend: Backend,
    suite: Suite,
    key: Zeroizing<[u8; KEY_LEN]>,
    prefix: [u8; NONCE_PREFIX_LEN],
    aad: Vec<u8>,
    segment_size: usize,
}

impl Segments {
    fn new(data_key: &[u8; KEY_LEN], header: &StreamHeader, context: &[u8]) -> Self {
        let suite_id = stream_suite_id(header.suite);
        let key = kdf::derive(
            data_key,
            &[LABEL_STREAM_KEY, &[suite_id], &header.nonce_prefix],
        );
        let immutable = header.bytes.get(..STREAM_IMMUTABLE_END).unwrap_or_default();
        Segments {
            backend: Backend::default(),
            suite: header.suite,
            key,
            prefix: header.nonce_prefix,
            aad: with_context(immutable, context),
            segment_size: header.segment_size as usize,
        }
    }

    pub(crate) fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    /// Plaintext bytes per segment.
    pub(crate) fn segment_size(&self) -> usize {
        self.segment_size
    }

    /// STREAM's nonce: prefix (7) ‖ counter (u32 BE) ‖ last flag (1).
    fn nonce(&self, index: u64, last: bool) -> Result<[u8; suite::NONCE_LEN], StreamError> {
        let counter =
            u32::try_from(index).map_err(|_| StreamError::TooLong { max: MAX_SEGMENTS })?;
        let mut nonce = [0u8; suite::NONCE_LEN];
        let (prefix, rest) = nonce.split_at_mut(NONCE_PREFIX_LEN);
        prefix.copy_from_slice(&self.prefix);
        let (ctr, flag) = rest.split_at_mut(4);
        ctr.copy_from_slice(&counter.to_be_bytes());
        flag.fill(u8::from(last));
        Ok(nonce)
    }

    /// Seals segment `index` in place; returns its tag.
    pub(crate) fn seal(
        &self,
        index: u64,
        last: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        let nonce = self.nonce(index, last)?;
        suite::seal(self.backend, self.suite, &self.key, &nonce, &self.aad, buf)
            .map_err(|_| CryptoError::Encrypt)
    }

    /// Seals segment `index` from `plaintext` into `out` (same length);
    /// returns its tag.
    pub(crate) fn seal_from(
        &self,
        index: u64,
        last: bool,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        let nonce = self.nonce(index, last)?;
        suite::seal_out_of_place(
            self.backend,
            self.suite,
            &self.key,
            &nonce,
            &self.aad,
            plaintext,
            out,
        )
        .map_err(|_| CryptoError::Encrypt)
    }

    /// Opens segment `index` (`ciphertext ‖ tag`) into `out`. On failure
    /// `out` is zeroized and the segment's error returned.
    pub(crate) fn open(
        &self,
        index: u64,
        last: bool,
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), StreamError> {
        let nonce = self.nonce(index, last)?;
        let opened = suite::open(
            self.backend,
            self.suite,
            &self.key,
            &nonce,
            &self.aad,
            ciphertext,
            tag,
            out,
        );
        if opened.is_err() {
            zeroize::Zeroize::zeroize(out);
            return Err(StreamError::Segment { index });
        }
        Ok(())
    }
}

/// Splits a sealed segment into ciphertext and tag.
fn split_tag(segment: &[u8]) -> Option<(&[u8], &[u8; TAG_LEN])> {
    let at = segment.len().checked_sub(TAG_LEN)?;
    let (ciphertext, tag) = segment.split_at_checked(at)?;
    Some((ciphertext, tag.try_into().ok()?))
}

/// Encrypts everything `reader` yields into a new stream written to
/// `writer`, under `master`, bound to `context`. Memory stays bounded by
/// about two segments. Returns the plaintext length.
///
/// ```
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey, Suite};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "export.csv");
/// let options = stream::StreamOptions::default().suite(Suite::ChaCha20Poly1305).segment_size(4096);
/// let plain = vec![7u8; 10_000];
/// let mut object = Vec::new();
/// assert_eq!(stream::encrypt(&master, options, &ctx, &plain[..], &mut object)?, 10_000);
/// // 111-byte header, 3 segments of 16-byte tags.
/// assert_eq!(object.len(), 10_000 + 111 + 3 * 16);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`CryptoError::Io`] when reading or writing fails, [`StreamError::SegmentSize`]
/// for bad options, [`CryptoError::Context`], [`CryptoError::Rng`].
pub fn encrypt<R: Read, W: Write>(
    master: &MasterKey,
    options: StreamOptions,
    context: &EncryptionContext,
    mut reader: R,
    writer: W,
) -> Result<u64, CryptoError> {
    let mut enc = Encryptor::new(master, options, context, writer)?;
    // Reads straight into the segment buffer: no intermediate copy.
    while enc.fill_from(&mut reader)? > 0 {}
    enc.finish_len()
}

/// Decrypts a whole stream from `reader` into `writer`; `master` must be
/// the version its header names. Returns the plaintext length.
///
/// Plaintext reaches `writer` segment by segment as each authenticates: if
/// this returns an error, `writer` may already hold the authentic beginning
/// of the object, and the caller must discard it.
///
/// # Errors
/// [`CryptoError::Format`], [`CryptoError::VersionMismatch`], [`CryptoError::Decrypt`] for
/// the header; [`StreamError`] for the segments; [`CryptoError::Io`].
pub fn decrypt<R: Read, W: Write>(
    master: &MasterKey,
    context: &EncryptionContext,
    reader: R,
    mut writer: W,
) -> Result<u64, CryptoError> {
    let mut dec = Decryptor::open(master, context, reader)?;
    dec.write_to(&mut writer)
}

/// Re-encrypts a stream under `to` with a fresh data key (for a suspected
/// compromise): reads it with `from`, writes a new stream with the same
/// suite and segment size to `writer`. Streaming: bounded memory. Returns
/// the plaintext length.
///
/// As with [`decrypt`], on error `writer` holds a partial stream that must
/// be discarded (it will not decrypt: it has no final segment).
///
/// # Errors
/// As [`decrypt`] and [`encrypt`].
pub fn reencrypt<R: Read, W: Write>(
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
    reader: R,
    writer: W,
) -> Result<u64, CryptoError> {
    let mut dec = Decryptor::open(from, context, reader)?;
    let options = StreamOptions::default()
        .suite(dec.header().suite())
        .segment_size(dec.header().segment_size());
    let mut enc = Encryptor::new(to, options, context, writer)?;
    dec.write_to(&mut enc)?;
    enc.finish_len()
}

/// Header-only rewrap of a stored stream: reads its 111-byte header from
/// the start of `object`, rewraps the data key from `from` to `to` (see
/// [`record::rewrap_header_in_place`](crate::format::record::rewrap_header_in_place))
/// checks the result (commitment included, [`record::check_header`](crate::format::record::check_header))
/// and writes the header back at offset 0. The payload is neither read nor
/// written: re-keying a 10 GiB object costs 111 bytes of I/O.
///
/// The header write is a single 111-byte `write_all` then `flush`; where a
/// torn write is possible, write the new header (returned) atomically
/// instead.
///
/// ```
/// use std::io::Cursor;
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
/// let (v1, v2) = (MasterKey::new(1, SecretKey::generate()?), MasterKey::new(2, SecretKey::generate()?));
/// let ctx = EncryptionContext::new().with("object", "o");
/// let mut file = Cursor::new(Vec::new());
/// stream::encrypt(&v1, Default::default(), &ctx, &b"payload"[..], &mut file)?;
/// let header = stream::rewrap_in_place(&mut file, &v1, &v2, &ctx)?;
/// assert_eq!(header.key_version(), 2);
/// let mut plain = Vec::new();
/// stream::decrypt(&v2, &ctx, &file.get_ref()[..], &mut plain)?;
/// assert_eq!(plain, b"payload");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`record::rewrap_header_in_place`](crate::format::record::rewrap_header_in_place),
/// and [`CryptoError::Io`]. On an error before the write, `object` is unchanged.
pub fn rewrap_in_place<F: Read + Write + Seek>(
    object: &mut F,
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<StreamHeader, CryptoError> {
    object.seek(SeekFrom::Start(0))?;
    let header = StreamHeader::read(object)?;
    let mut bytes = *header.as_bytes();
    crate::format::record::rewrap_header_in_place(&mut bytes, from, to, context)?;
    // The rewrap carries the commitment over unchecked: check it before
    // anything is written.
    crate::format::record::check_header(&bytes, to, context)?;
    object.seek(SeekFrom::Start(0))?;
    object.write_all(&bytes)?;
    object.flush()?;
    StreamHeader::parse(&bytes)
}

/// Bytes a stream of `plaintext_len` bytes takes with segments of
/// `segment_size` plaintext bytes: the 111-byte header plus a 16-byte tag
/// per segment (`plaintext_len / segment_size + 1` segments).
///
/// ```
/// # use keyfold_core::stream::ciphertext_len;
/// assert_eq!(ciphertext_len(0, 65536), Some(111 + 16));
/// assert_eq!(ciphertext_len(65536, 65536), Some(111 + 65536 + 2 * 16));
/// ```
pub fn ciphertext_len(plaintext_len: u64, segment_size: u32) -> Option<u64> {
    let segments = plaintext_len
        .checked_div(u64::from(segment_size))?
        .checked_add(1)?;
    if segments > MAX_SEGMENTS {
        return None;
    }
    plaintext_len
        .checked_add(STREAM_HEADER_LEN as u64)?
        .checked_add(segments.checked_mul(TAG_LEN as u64)?)
}

/// Hooks for the fuzz targets under `fuzz/`: they must never panic except
/// on a broken property (the panic is the finding).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz_hooks {
    use super::*;

    /// Odd first byte: arbitrary bytes decrypted as a stream under a fixed
    /// key, through the `Read` adapter and the random-access reader.
    /// Even first byte: the rest of the input is encrypted (segment size
    /// from the input), then optionally cut and bit-flipped as the input
    /// says, then decrypted both ways: an untouched object must give back
    /// its plaintext, a changed one must be rejected.
    #[allow(clippy::panic, reason = "a broken property must crash the fuzzer")]
    pub fn decrypt(data: &[u8]) {
        let master = MasterKey::new(
            1,
            crate::format::secret::SecretKey::from_bytes(&mut [0x42; KEY_LEN]),
        );
        let ctx = EncryptionContext::new().with("fuzz", data.get(1..3).unwrap_or_default());
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        if mode & 1 == 1 {
            let _ = open_both(&master, &ctx, rest);
            return;
        }
        let Some((ops, plaintext)) = rest.split_at_checked(8) else {
            return;
        };
        let byte = |i: usize| usize::from(ops.get(i).copied().unwrap_or(0));
        let options = StreamOptions::default()
            .segment_size(MIN_SEGMENT_SIZE + ops.first().copied().map_or(0, u32::from));
        let mut object = Vec::new();
        if encrypt(&master, options, &ctx, plaintext, &mut object).is_err() {
            panic!("encrypt failed");
        }
        let original = object.clone();
        let cut = byte(1) << 8 | byte(2);
        if cut > 0 {
            object.truncate(object.len().saturating_sub(cut));
        }
        if let Some(len) = std::num::NonZeroUsize::new(object.len()) {
            let at = (byte(3) << 8 | byte(4)) % len.get();
            if let Some(b) = object.get_mut(at) {
                *b ^= ops.get(5).copied().unwrap_or(0);
            }
        }
        let opened = open_both(&master, &ctx, &object);
        if object == original {
            match opened {
                Ok(plain) if plain == plaintext => {}
                _ => panic!("an untouched stream did not decrypt to its plaintext"),
            }
        } else if opened.is_ok() {
            panic!("a modified stream was accepted");
        }
    }

    /// Decrypts with the `Read` adapter, the `BufRead` adapter and reads the
    /// whole range with the random-access reader; all must agree.
    #[allow(clippy::panic, reason = "a broken property must crash the fuzzer")]
    fn open_both(
        master: &MasterKey,
        ctx: &EncryptionContext,
        object: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut plain = Vec::new();
        let streamed = super::decrypt(master, ctx, object, &mut plain).map(|_| plain);
        let seeked = StreamHeader::parse(object).and_then(|header| {
            let mut seek = SeekDecryptor::new(header, master, ctx, io::Cursor::new(object))?;
            let len = seek.plaintext_len();
            seek.read_range(0..len)
        });
        match (&streamed, &seeked) {
            (Ok(a), Ok(b)) if a == b => {}
            (Err(_), Err(_)) => {}
            _ => panic!("the Read adapter and the random-access reader disagree"),
        }
        // The BufRead adapter, borrowing whole segments from the slice,
        // with reads of a size taken from the input.
        let chunk = 1 + usize::from(object.get(3).copied().unwrap_or(0)) * 3;
        let buffered = BufDecryptor::open(master, ctx, object).and_then(|mut dec| {
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk];
            loop {
                match io::Read::read(&mut dec, &mut buf) {
                    Ok(0) => return Ok(out),
                    Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    Err(e) => return Err(CryptoError::from(e)),
                }
            }
        });
        match (&streamed, &buffered) {
            (Ok(a), Ok(b)) if a == b => {}
            (Err(a), Err(b)) if a.to_string() == b.to_string() => {}
            _ => panic!("the Read and BufRead adapters disagree"),
        }
        streamed
    }
}
