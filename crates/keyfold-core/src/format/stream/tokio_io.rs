//! `tokio::io::AsyncWrite` / `AsyncRead` adapters (feature `async-io`),
//! driving the same sans-I/O encoder and decoder as the sync adapters.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::read::DecodeCore;
use super::write::EncodeCore;
use super::{StreamHeader, StreamOptions};
use crate::format::STREAM_HEADER_LEN;
use crate::format::context::EncryptionContext;
use crate::format::error::CryptoError;
use crate::format::secret::MasterKey;

impl StreamHeader {
    /// Reads exactly the header from an async reader.
    ///
    /// # Errors
    /// As [`StreamHeader::read`].
    pub async fn read_async<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, CryptoError> {
        let mut bytes = [0u8; STREAM_HEADER_LEN];
        let mut got = 0;
        while let Some(rest) = bytes.get_mut(got..) {
            if rest.is_empty() {
                break;
            }
            match reader.read(rest).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::parse_read(&bytes, got)
    }
}

/// Encrypts a stream into a `tokio::io::AsyncWrite`; `shutdown()` seals the
/// final segment, writes it out and shuts the inner writer down. Without
/// `shutdown()` the stream has no final segment and every reader rejects it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use keyfold_core::{stream, EncryptionContext, MasterKey, SecretKey};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "upload-9");
///
/// let mut enc = stream::AsyncEncryptor::new(&master, Default::default(), &ctx, Vec::new())?;
/// enc.write_all(b"streamed asynchronously").await?;
/// enc.shutdown().await?;
/// let object = enc.into_inner();
///
/// let mut dec = stream::AsyncDecryptor::open(&master, &ctx, &object[..]).await?;
/// let mut plain = Vec::new();
/// dec.read_to_end(&mut plain).await?;
/// assert_eq!(plain, b"streamed asynchronously");
/// # Ok(()) }
/// ```
pub struct AsyncEncryptor<W: AsyncWrite + Unpin> {
    inner: W,
    core: EncodeCore,
}

impl<W: AsyncWrite + Unpin> std::fmt::Debug for AsyncEncryptor<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEncryptor")
            .field("header", self.core.header())
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> AsyncEncryptor<W> {
    /// As [`Encryptor::new`](super::Encryptor::new).
    ///
    /// # Errors
    /// As [`Encryptor::new`](super::Encryptor::new).
    pub fn new(
        master: &MasterKey,
        options: StreamOptions,
        context: &EncryptionContext,
        inner: W,
    ) -> Result<Self, CryptoError> {
        Ok(AsyncEncryptor {
            inner,
            core: EncodeCore::new(master, options, context)?,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        self.core.header()
    }

    /// Bytes of buffer held: one segment plus its tag, and the header.
    pub fn buffered_capacity(&self) -> usize {
        self.core.buffered_capacity()
    }

    /// The inner writer (after `shutdown()`, the complete stream).
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let pending = self.core.pending();
            if pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.core.advance(n);
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for AsyncEncryptor<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            ready!(this.poll_drain(cx))?;
            let n = this.core.accept(data)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.core.is_finished() {
            this.core.finish()?;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Decrypts a stream from a `tokio::io::AsyncRead`, releasing each segment
/// only after it authenticated; a missing final segment is an error at the
/// end, never a clean end of file. As with
/// [`Decryptor`](super::Decryptor), do not act on data from a stream that
/// later fails. See [`AsyncEncryptor`] for an example.
pub struct AsyncDecryptor<R: AsyncRead + Unpin> {
    inner: R,
    core: DecodeCore,
}

impl<R: AsyncRead + Unpin> std::fmt::Debug for AsyncDecryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncDecryptor")
            .field("header", self.core.header())
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> AsyncDecryptor<R> {
    /// As [`Decryptor::new`](super::Decryptor::new): `inner` is positioned
    /// just after `header`.
    ///
    /// # Errors
    /// As [`Decryptor::new`](super::Decryptor::new).
    pub fn new(
        header: StreamHeader,
        master: &MasterKey,
        context: &EncryptionContext,
        inner: R,
    ) -> Result<Self, CryptoError> {
        Ok(AsyncDecryptor {
            inner,
            core: DecodeCore::new(header, master, context)?,
        })
    }

    /// Reads the header from `inner`, then as [`new`](Self::new).
    ///
    /// # Errors
    /// As [`StreamHeader::read_async`] and [`new`](Self::new).
    pub async fn open(
        master: &MasterKey,
        context: &EncryptionContext,
        mut inner: R,
    ) -> Result<Self, CryptoError> {
        let header = StreamHeader::read_async(&mut inner).await?;
        Self::new(header, master, context, inner)
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        self.core.header()
    }

    /// Bytes of buffer held (about two segments).
    pub fn buffered_capacity(&self) -> usize {
        self.core.buffered_capacity()
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for AsyncDecryptor<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.core.available().is_empty() || out.remaining() == 0 {
                let n = this.core.available().len().min(out.remaining());
                out.put_slice(this.core.available().get(..n).unwrap_or_default());
                this.core.consume(n);
                return Poll::Ready(Ok(()));
            }
            match this.core.status() {
                Some(Ok(())) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(CryptoError::Stream(e).into())),
                None => {}
            }
            let mut spare = ReadBuf::new(this.core.spare());
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut spare))?;
            let n = spare.filled().len();
            this.core
                .filled(n, None)
                .map_err(|e| io::Error::from(CryptoError::Stream(e)))?;
        }
    }
}
