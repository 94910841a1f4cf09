//! Record operations at the format level: encrypt, decrypt, rewrap,
//! re-encrypt (docs/FORMAT.md, "Operations").
//!
//! These take the master key version directly; the keyring picks it for you.

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::format::context::EncryptionContext;
use crate::format::error::CryptoError;
use crate::format::kdf;
use crate::format::rng;
use crate::format::secret::{KEY_LEN, MasterKey};
use crate::format::suite::{
    Backend, Suite, TAG_LEN, open_single_use, open_single_use_in_place, seal_single_use,
};
use crate::format::{
    COMMITMENT_LEN, FORMAT_V1, HEADER_LEN, HeaderInfo, HeaderKind, HeaderView, IMMUTABLE_END,
    MAGIC, MAX_RECORD_PLAINTEXT, RECORD_OVERHEAD, REWRAP_PART_LEN, RecordView, STREAM_HEADER_LEN,
    WRAP_NONCE_LEN, WRAPPED_DATA_KEY_LEN,
};

// KDF labels (docs/FORMAT.md, "Key derivation"), each followed by the suite
// byte; at most 19 bytes in all, so each derivation is one SHA-256 block.
// Never reuse one for another purpose. The wrap key's label lives with
// `MasterKey`, the stream key's with the stream.
const LABEL_PAYLOAD: &[u8] = b"keyfold1 payload";
const LABEL_COMMIT: &[u8] = b"keyfold1 commit";
/// The commitment of a stream's data key (docs/FORMAT.md, "Streaming").
const LABEL_STREAM_COMMIT: &[u8] = b"keyfold1 s-commit";

/// Keys derived from one record's data key.
struct PayloadKeys {
    key: Zeroizing<[u8; KEY_LEN]>,
    commitment: Zeroizing<[u8; COMMITMENT_LEN]>,
}

fn payload_keys(data_key: &[u8; KEY_LEN], suite: Suite) -> PayloadKeys {
    PayloadKeys {
        key: kdf::derive(data_key, &[LABEL_PAYLOAD, &[suite.id()]]),
        commitment: kdf::derive(data_key, &[LABEL_COMMIT, &[suite.id()]]),
    }
}

/// The commitment to `data_key` that a header of `kind` with suite byte
/// `suite_id` carries (docs/FORMAT.md, "Commitment").
pub(crate) fn commitment(
    data_key: &[u8; KEY_LEN],
    kind: HeaderKind,
    suite_id: u8,
) -> Zeroizing<[u8; COMMITMENT_LEN]> {
    let label = match kind {
        HeaderKind::Record => LABEL_COMMIT,
        HeaderKind::Stream => LABEL_STREAM_COMMIT,
    };
    kdf::derive(data_key, &[label, &[suite_id]])
}

pub(crate) fn with_context(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

/// Writes version, the wrap nonce and the data key sealed under `master`
/// into the rewrap part of `header` (its last 64 bytes); the immutable part
/// before it must be final. `header` is a whole record or stream header
/// (docs/FORMAT.md, "Wrap").
pub(crate) fn write_wrap(
    header: &mut [u8],
    master: &MasterKey,
    data_key: &[u8; KEY_LEN],
    nonce: &[u8; WRAP_NONCE_LEN],
    context: &[u8],
) -> Result<(), CryptoError> {
    let immutable_end = header
        .len()
        .checked_sub(REWRAP_PART_LEN)
        .ok_or(CryptoError::Encrypt)?;
    let wrapped_at = immutable_end + REWRAP_PART_LEN - WRAPPED_DATA_KEY_LEN;
    let (aad_part, wrapped) = header
        .split_at_mut_checked(wrapped_at)
        .ok_or(CryptoError::Encrypt)?;
    let (_, mutable) = aad_part
        .split_at_mut_checked(immutable_end)
        .ok_or(CryptoError::Encrypt)?;
    let (version, nonce_out) = mutable
        .split_at_mut_checked(4)
        .ok_or(CryptoError::Encrypt)?;
    version.copy_from_slice(&master.version().to_be_bytes());
    nonce_out.copy_from_slice(nonce);
    let aad = with_context(aad_part, context);
    let (sealed, tag_out) = wrapped
        .split_at_mut_checked(KEY_LEN)
        .ok_or(CryptoError::Encrypt)?;
    sealed.copy_from_slice(data_key);
    let tag = match master.wrap_cipher().seal(nonce, &aad, sealed) {
        Ok(tag) => tag,
        Err(_) => {
            // A failed seal may leave the data key in clear in the caller's
            // header buffer: wipe it before handing the buffer back.
            sealed.zeroize();
            return Err(CryptoError::Encrypt);
        }
    };
    tag_out.copy_from_slice(&tag);
    Ok(())
}

/// Opens the wrapped data key of a record's or stream's header under
/// `master`. The wrap authenticates every header byte before the wrapped
/// key, the commitment included; whether the commitment matches the data
/// key is [`open_committed`]'s check.
fn open_wrap(
    view: &HeaderView<'_>,
    master: &MasterKey,
    context: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    if view.version != master.version() {
        return Err(CryptoError::VersionMismatch {
            record: view.version,
            supplied: master.version(),
        });
    }
    let aad = with_context(view.wrap_aad(), context);
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    let (sealed, tag) = view.wrapped_data_key.split_at(KEY_LEN);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Decrypt)?;
    master
        .wrap_cipher()
        .open(view.wrap_nonce, &aad, sealed, tag, &mut *data_key)
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(data_key)
}

/// Constant-time comparison of two commitments, 8 bytes at a time (`subtle`
/// hides each word from the optimizer; per byte it cost more than the
/// SHA-256 that computed the commitment).
fn commitments_match(a: &[u8; COMMITMENT_LEN], b: &[u8; COMMITMENT_LEN]) -> bool {
    let words = |c: &[u8; COMMITMENT_LEN]| {
        let mut w = [0u64; COMMITMENT_LEN / 8];
        for (word, bytes) in w.iter_mut().zip(c.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            *word = u64::from_le_bytes(le);
        }
        w
    };
    let (a, b) = (words(a), words(b));
    let mut equal = subtle::Choice::from(1);
    for (x, y) in a.iter().zip(&b) {
        equal &= x.ct_eq(y);
    }
    bool::from(equal)
}

/// [`open_wrap`], then checks the header's commitment to the data key: the
/// step that binds the data key to the payload, done before any payload
/// byte is released.
pub(crate) fn open_committed(
    view: &HeaderView<'_>,
    master: &MasterKey,
    context: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let data_key = open_wrap(view, master, context)?;
    let expected = commitment(&data_key, view.kind, view.suite_id);
    if !commitments_match(&expected, view.commitment) {
        return Err(CryptoError::Decrypt);
    }
    Ok(data_key)
}

/// Encrypts `plaintext` into a new record under `master`, bound to `context`.
///
/// A fresh random data key seals the payload; it is wrapped under `master`
/// and stored in the header.
///
/// ```
/// use keyfold_core::{record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("tenant", "acme").with("row", "42");
/// let ct = record::encrypt(&master, Suite::Aes256Gcm, &ctx, b"card 4111")?;
/// assert_eq!(ct.len(), 9 + keyfold_core::format::RECORD_OVERHEAD);
/// assert_eq!(record::decrypt(&master, &ctx, &ct)?, b"card 4111");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`CryptoError::Context`] for an oversized context, [`CryptoError::PlaintextTooLarge`]
/// above 4 GiB, [`CryptoError::Rng`] if the OS generator fails.
pub fn encrypt(
    master: &MasterKey,
    suite: Suite,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    encrypt_with(Backend::default(), master, suite, context, plaintext)
}

/// [`encrypt`] with the payload sealed by a chosen [`Backend`] (the output
/// is the same whichever backend runs).
///
/// # Errors
/// As [`encrypt`].
pub fn encrypt_with(
    backend: Backend,
    master: &MasterKey,
    suite: Suite,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (context, fresh) = prepare(plaintext.len(), context)?;
    seal_with(
        backend,
        master,
        suite,
        &context,
        &fresh.data_key,
        &fresh.nonce,
        plaintext,
    )
}

/// A new record's random secrets: its data key and wrap nonce.
#[derive(zeroize::ZeroizeOnDrop)]
struct FreshSecrets {
    data_key: [u8; KEY_LEN],
    nonce: [u8; WRAP_NONCE_LEN],
}

/// What every encrypt does first: checks the plaintext length, encodes the
/// context and draws the data key and wrap nonce (one generator call for
/// both).
fn prepare(
    plaintext_len: usize,
    context: &EncryptionContext,
) -> Result<(Vec<u8>, FreshSecrets), CryptoError> {
    if plaintext_len as u64 > MAX_RECORD_PLAINTEXT {
        return Err(CryptoError::PlaintextTooLarge {
            len: plaintext_len as u64,
            max: MAX_RECORD_PLAINTEXT,
        });
    }
    let context = context.encode()?;
    let mut fresh = FreshSecrets {
        data_key: [0; KEY_LEN],
        nonce: [0; WRAP_NONCE_LEN],
    };
    let mut bytes = Zeroizing::new([0u8; KEY_LEN + WRAP_NONCE_LEN]);
    rng::fill(&mut *bytes)?;
    let (data_key, nonce) = bytes.split_at(KEY_LEN);
    fresh.data_key.copy_from_slice(data_key);
    fresh.nonce.copy_from_slice(nonce);
    Ok((context, fresh))
}

/// Encrypts with a caller-chosen data key and wrap nonce: the deterministic
/// core of [`encrypt`], for known-answer vectors only.
pub(crate) fn seal_with(
    backend: Backend,
    master: &MasterKey,
    suite: Suite,
    context: &[u8],
    data_key: &[u8; KEY_LEN],
    nonce: &[u8; WRAP_NONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    // Sealed from `plaintext` straight into the new record: zero-filling
    // the output is cheaper than copying the plaintext in first.
    let mut out = vec![0u8; RECORD_OVERHEAD + plaintext.len()];
    seal_laid_out(
        backend,
        master,
        suite,
        context,
        data_key,
        nonce,
        &mut out,
        Some(plaintext),
    )?;
    Ok(out)
}

/// Seals `buf`, laid out as `[HEADER_LEN bytes][payload][TAG_LEN bytes]`,
/// into a record where it lies: writes the header and the tag, and
/// encrypts the payload region in place, or `source` (as long as the
/// payload region) into it.
#[allow(
    clippy::too_many_arguments,
    reason = "the record's inputs, kept flat for the hot path"
)]
fn seal_laid_out(
    backend: Backend,
    master: &MasterKey,
    suite: Suite,
    context: &[u8],
    data_key: &[u8; KEY_LEN],
    nonce: &[u8; WRAP_NONCE_LEN],
    buf: &mut [u8],
    source: Option<&[u8]>,
) -> Result<(), CryptoError> {
    let keys = payload_keys(data_key, suite);
    let (header, rest) = buf
        .split_at_mut_checked(HEADER_LEN)
        .ok_or(CryptoError::Encrypt)?;
    let payload_len = rest
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CryptoError::Encrypt)?;
    let (payload, tag_out) = rest.split_at_mut(payload_len);
    let (preamble, rewrap_part) = header.split_at_mut(IMMUTABLE_END);
    rewrap_part.fill(0);
    let (fixed, commitment_out) = preamble.split_at_mut(4);
    fixed.copy_from_slice(&[MAGIC[0], MAGIC[1], FORMAT_V1, suite.id()]);
    commitment_out.copy_from_slice(&*keys.commitment);
    write_wrap(header, master, data_key, nonce, context)?;

    let aad = with_context(header.get(..IMMUTABLE_END).unwrap_or_default(), context);
    // The payload key is derived from a data key used for this one payload:
    // the fixed nonce is never reused (docs/FORMAT.md, "Nonces").
    let tag = match source {
        Some(plaintext) => crate::format::suite::seal_out_of_place(
            backend,
            suite,
            &keys.key,
            &[0; crate::format::suite::NONCE_LEN],
            &aad,
            plaintext,
            payload,
        ),
        None => seal_single_use(backend, suite, &keys.key, &aad, payload),
    }
    .map_err(|_| CryptoError::Encrypt)?;
    tag_out.copy_from_slice(&tag);
    Ok(())
}

/// [`encrypt`] without allocating or copying the payload: `buf` is laid out as
/// `[HEADER_LEN bytes, any value][plaintext][TAG_LEN bytes, any value]`
/// (so [`RECORD_OVERHEAD`] bytes longer than the plaintext) and becomes the
/// record in place. For hot paths that own their buffers; [`encrypt`] is
/// the same function with a fresh `Vec`.
///
/// ```
/// use keyfold_core::{format::HEADER_LEN, suite::TAG_LEN};
/// use keyfold_core::{record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let master = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("row", "42");
/// let mut buf = vec![0u8; HEADER_LEN];
/// buf.extend_from_slice(b"card 4111");
/// buf.extend_from_slice(&[0u8; TAG_LEN]);
/// record::encrypt_in_place(&master, Suite::default(), &ctx, &mut buf)?;
/// assert_eq!(record::decrypt_in_place(&master, &ctx, &mut buf)?, b"card 4111");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`CryptoError::Format`] when `buf` is shorter than [`RECORD_OVERHEAD`], else
/// as [`encrypt`]. On error `buf`'s contents are unspecified.
pub fn encrypt_in_place(
    master: &MasterKey,
    suite: Suite,
    context: &EncryptionContext,
    buf: &mut [u8],
) -> Result<(), CryptoError> {
    let plaintext_len = buf.len().checked_sub(RECORD_OVERHEAD).ok_or(
        crate::format::error::FormatError::TooShort {
            what: "record buffer",
            needed: RECORD_OVERHEAD,
            got: buf.len(),
        },
    )?;
    let (context, fresh) = prepare(plaintext_len, context)?;
    seal_laid_out(
        Backend::default(),
        master,
        suite,
        &context,
        &fresh.data_key,
        &fresh.nonce,
        buf,
        None,
    )
}

/// Decrypts a record. `master` must be the version the record names
/// ([`format::inspect`](crate::format::inspect) reads it).
///
/// # Errors
/// [`CryptoError::Format`] for malformed input, [`CryptoError::VersionMismatch`] when
/// `master` is another version, [`CryptoError::Decrypt`] when the key, the context
/// or any byte of the record is wrong.
pub fn decrypt(
    master: &MasterKey,
    context: &EncryptionContext,
    record: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    decrypt_with(Backend::default(), master, context, record)
}

/// [`decrypt`] with the payload opened by a chosen [`Backend`].
///
/// # Errors
/// As [`decrypt`].
pub fn decrypt_with(
    backend: Backend,
    master: &MasterKey,
    context: &EncryptionContext,
    record: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let view = RecordView::parse(record)?;
    let context = context.encode()?;
    let data_key = open_committed(&view.header(), master, &context)?;
    open_payload(backend, &view, &data_key, &context)
}

fn open_payload(
    backend: Backend,
    view: &RecordView<'_>,
    data_key: &[u8; KEY_LEN],
    context: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    // The commitment was checked when the wrap was opened: derive the key only.
    let key = kdf::derive(data_key, &[LABEL_PAYLOAD, &[view.suite.id()]]);
    let aad = with_context(view.immutable_header(), context);
    let mut plaintext = vec![0u8; view.payload.len()];
    let opened = open_single_use(
        backend,
        view.suite,
        &key,
        &aad,
        view.payload,
        view.tag,
        &mut plaintext,
    );
    if opened.is_err() {
        // Don't hand back unauthenticated bytes, even by accident.
        zeroize::Zeroize::zeroize(&mut plaintext);
        return Err(CryptoError::Decrypt);
    }
    Ok(plaintext)
}

/// [`decrypt`] without allocating or copying the payload: decrypts it where
/// it lies in `record` and returns it, a slice of `record`.
///
/// # Errors
/// As [`decrypt`]. When the payload fails to authenticate, its bytes in
/// `record` are zeroized (in-place decryption has overwritten them), so keep
/// a copy if you need the ciphertext after a failure; format and key errors
/// leave `record` unchanged.
pub fn decrypt_in_place<'a>(
    master: &MasterKey,
    context: &EncryptionContext,
    record: &'a mut [u8],
) -> Result<&'a mut [u8], CryptoError> {
    let context = context.encode()?;
    let (key, suite, aad, tag) = {
        let view = RecordView::parse(record)?;
        let data_key = open_committed(&view.header(), master, &context)?;
        (
            kdf::derive(&data_key, &[LABEL_PAYLOAD, &[view.suite.id()]]),
            view.suite,
            with_context(view.immutable_header(), &context),
            *view.tag,
        )
    };
    let end = record.len().saturating_sub(TAG_LEN);
    let payload = record
        .get_mut(HEADER_LEN..end)
        .ok_or(CryptoError::Decrypt)?;
    match open_single_use_in_place(Backend::default(), suite, &key, &aad, payload, &tag) {
        Ok(()) => Ok(payload),
        Err(_) => {
            zeroize::Zeroize::zeroize(payload);
            Err(CryptoError::Decrypt)
        }
    }
}

/// Moves a record from master key version `from` to `to` by rewriting only
/// its header: the data key is unwrapped with `from` and wrapped with `to`.
/// The payload bytes are not read or changed, so the cost does not depend on
/// the record's size. The result has the same length as the input.
///
/// ```
/// use keyfold_core::{format, record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let v1 = MasterKey::new(1, SecretKey::generate()?);
/// let v2 = MasterKey::new(2, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("row", "7");
/// let old = record::encrypt(&v1, Suite::default(), &ctx, b"payload")?;
/// let new = record::rewrap(&old, &v1, &v2, &ctx)?;
/// assert_eq!(format::inspect(&new)?.key_version, 2);
/// assert_eq!(old[format::RECORD_OVERHEAD - 16..], new[format::RECORD_OVERHEAD - 16..]);
/// assert_eq!(record::decrypt(&v2, &ctx, &new)?, b"payload");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`CryptoError::Format`], [`CryptoError::VersionMismatch`], or [`CryptoError::Decrypt`] when
/// `from` or the context is wrong or the header's rewrap part was modified;
/// the input is never modified. A header whose commitment does not match its
/// data key is rewrapped as it is and still fails to decrypt afterwards
/// (check results with [`check_header`]).
pub fn rewrap(
    record: &[u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<Vec<u8>, CryptoError> {
    let mut out = record.to_vec();
    rewrap_in_place(&mut out, from, to, context)?;
    Ok(out)
}

/// [`rewrap`] on a buffer the caller owns. On error the buffer is unchanged.
///
/// # Errors
/// As [`rewrap`].
pub fn rewrap_in_place(
    record: &mut [u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<(), CryptoError> {
    let context = context.encode()?;
    let len = RecordView::parse(record)?.header().bytes.len();
    let header = record.get_mut(..len).ok_or(CryptoError::Decrypt)?;
    rewrite_wrap(header, from, to, &context)
}

/// [`rewrap`], returning only bytes proven to decrypt under `to`: what the
/// rewrap job checks before it writes a row back ("never write what we
/// cannot read back"), in one pass.
///
/// The data key is opened from the old wrap and sealed under `to` into a
/// copy of the record; then that copy, the very bytes returned, is
/// decrypted under `to` as [`decrypt`] would (new wrap opened, commitment
/// checked, payload authenticated; the plaintext is zeroized and dropped).
/// The same AEAD and hash work as [`rewrap`] followed by [`decrypt`], with
/// the context encoded once instead of twice (docs/FORMAT.md,
/// "Operations").
///
/// ```
/// use keyfold_core::{record, CryptoError, EncryptionContext, MasterKey, SecretKey, Suite};
/// let v1 = MasterKey::new(1, SecretKey::generate()?);
/// let v2 = MasterKey::new(2, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("row", "7");
/// let old = record::encrypt(&v1, Suite::default(), &ctx, b"payload")?;
/// let new = record::rewrap_verified(&old, &v1, &v2, &ctx)?;
/// assert_eq!(new, record::rewrap(&old, &v1, &v2, &ctx)?);
/// // A record whose payload was damaged is refused, not moved.
/// let mut damaged = old.clone();
/// *damaged.last_mut().unwrap() ^= 1;
/// assert!(record::rewrap(&damaged, &v1, &v2, &ctx).is_ok());
/// assert!(matches!(
///     record::rewrap_verified(&damaged, &v1, &v2, &ctx),
///     Err(CryptoError::Decrypt)
/// ));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`rewrap`], and [`CryptoError::Decrypt`] when the result would not
/// decrypt under `to` (a damaged payload, a commitment that does not match
/// its data key: what [`rewrap`] alone carries over).
pub fn rewrap_verified(
    record: &[u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<Vec<u8>, CryptoError> {
    let context = context.encode()?;
    let len = RecordView::parse(record)?.header().bytes.len();
    let mut out = record.to_vec();
    let header = out.get_mut(..len).ok_or(CryptoError::Decrypt)?;
    rewrite_wrap(header, from, to, &context)?;
    // Read back exactly what is returned.
    let view = RecordView::parse(&out)?;
    let data_key = open_committed(&view.header(), to, &context)?;
    drop(Zeroizing::new(open_payload(
        Backend::default(),
        &view,
        &data_key,
        &context,
    )?));
    Ok(out)
}

/// Re-seals the data key of `header` (exactly one record or stream header)
/// from `from` to `to`, keeping its wrap nonce: the nonce was drawn at
/// random independently of any key, so under `to` it is as fresh as a new
/// one, and the same record rewrapped to the same version twice gets the
/// same bytes, which GCM-SIV allows (docs/FORMAT.md, "Nonces"). No
/// randomness, so a rewrap makes no system call.
///
/// The commitment is not checked here: the wrap authenticates it together
/// with the data key, and a rewrap copies both unchanged, so a header whose
/// commitment does not match its data key fails to decrypt after a rewrap
/// exactly as before (docs/FORMAT.md, "Operations"). [`check_header`]
/// checks it.
fn rewrite_wrap(
    header: &mut [u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &[u8],
) -> Result<(), CryptoError> {
    let view = HeaderView::parse_prefix(header)?;
    let nonce = *view.wrap_nonce;
    let data_key = open_wrap(&view, from, context)?;
    // Build the new header aside, so a failure leaves the input untouched.
    let mut aside = [0u8; STREAM_HEADER_LEN];
    let new = aside.get_mut(..header.len()).ok_or(CryptoError::Decrypt)?;
    new.copy_from_slice(header);
    write_wrap(new, to, &data_key, &nonce, context)?;
    header.copy_from_slice(new);
    Ok(())
}

/// Header-only rewrap of a record **or a stream**: `buf` starts with the
/// header (100 bytes for a record, 111 for a stream) and may hold just
/// that, or the whole object. Only the header's rewrap part (version, wrap
/// nonce, wrapped data key) is rewritten, under `to`.
/// The data key is opened with `from`; the commitment is carried over
/// unchanged (check the result with [`check_header`] before writing it
/// back, as the rewrap job does). Bytes after the header are not read or
/// written: re-keying a 10 GiB object rewrites 111 bytes (docs/FORMAT.md,
/// "Operations").
///
/// ```
/// use keyfold_core::{format, record, stream, EncryptionContext, MasterKey, SecretKey};
/// let v1 = MasterKey::new(1, SecretKey::generate()?);
/// let v2 = MasterKey::new(2, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("object", "backup-7");
/// let mut object = Vec::new();
/// stream::encrypt(&v1, Default::default(), &ctx, &b"big"[..], &mut object)?;
/// // Only the header is needed: the payload may stay in object storage.
/// let mut header = object[..format::STREAM_HEADER_LEN].to_vec();
/// let info = record::rewrap_header_in_place(&mut header, &v1, &v2, &ctx)?;
/// assert_eq!(info.key_version, 2);
/// object[..format::STREAM_HEADER_LEN].copy_from_slice(&header);
/// let mut plain = Vec::new();
/// stream::decrypt(&v2, &ctx, &object[..], &mut plain)?;
/// assert_eq!(plain, b"big");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`CryptoError::Format`] when `buf` does not start with a whole header,
/// [`CryptoError::VersionMismatch`], or [`CryptoError::Decrypt`] when `from`, the
/// context or the header is wrong. On error `buf` is unchanged.
pub fn rewrap_header_in_place(
    buf: &mut [u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<HeaderInfo, CryptoError> {
    let context = context.encode()?;
    let len = HeaderView::parse_prefix(buf)?.bytes.len();
    let header = buf.get_mut(..len).ok_or(CryptoError::Decrypt)?;
    rewrite_wrap(header, from, to, &context)?;
    Ok(crate::format::inspect_header(buf)?)
}

/// Checks the header of a record or stream under `master` without its
/// payload: opens the wrapped data key and verifies the commitment. This is
/// how a header-only rewrap is verified before it is written back.
///
/// ```
/// use keyfold_core::{format, record, EncryptionContext, MasterKey, SecretKey, Suite};
/// let key = MasterKey::new(1, SecretKey::generate()?);
/// let ctx = EncryptionContext::new().with("row", "1");
/// let ct = record::encrypt(&key, Suite::default(), &ctx, b"x")?;
/// record::check_header(&ct[..format::HEADER_LEN], &key, &ctx)?;
/// assert!(record::check_header(&ct, &key, &EncryptionContext::new()).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`rewrap_header_in_place`].
pub fn check_header(
    buf: &[u8],
    master: &MasterKey,
    context: &EncryptionContext,
) -> Result<HeaderInfo, CryptoError> {
    let context = context.encode()?;
    let view = HeaderView::parse_prefix(buf)?;
    open_committed(&view, master, &context)?;
    Ok(crate::format::inspect_header(buf)?)
}

/// Decrypts with `from` and encrypts again under `to` with a fresh data key
/// and the same suite: for a suspected compromise, when rewrapping the old
/// data key is not enough.
///
/// # Errors
/// As [`decrypt`] and [`encrypt`].
pub fn reencrypt(
    record: &[u8],
    from: &MasterKey,
    to: &MasterKey,
    context: &EncryptionContext,
) -> Result<Vec<u8>, CryptoError> {
    let view = RecordView::parse(record)?;
    let plaintext = Zeroizing::new(decrypt(from, context, record)?);
    encrypt(to, view.suite, context, &plaintext)
}

/// Hooks for the fuzz targets under `fuzz/`: they must never panic.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz_hooks {
    use super::*;

    /// Parses arbitrary bytes.
    pub fn parse(data: &[u8]) {
        let _ = crate::format::inspect(data);
    }

    /// Decrypts arbitrary bytes under a fixed key with a context taken from the input.
    pub fn decrypt(data: &[u8]) {
        let master = MasterKey::new(
            u32::from(data.first().copied().unwrap_or(0)),
            crate::format::secret::SecretKey::from_bytes(&mut [0x42; KEY_LEN]),
        );
        let ctx = EncryptionContext::new().with("fuzz", data.get(1..3).unwrap_or_default());
        let _ = super::decrypt(&master, &ctx, data.get(3..).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::secret::SecretKey;

    /// A record whose wrap opens to a data key other than the one its
    /// commitment names, with a payload that opens under that other key:
    /// only the commitment check stands between it and a successful decrypt.
    fn forged(master: &MasterKey, suite: Suite, ctx: &[u8]) -> Vec<u8> {
        let (committed, actual) = ([1u8; KEY_LEN], [2u8; KEY_LEN]);
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&[MAGIC[0], MAGIC[1], FORMAT_V1, suite.id()]);
        header[4..IMMUTABLE_END].copy_from_slice(&*payload_keys(&committed, suite).commitment);
        write_wrap(&mut header, master, &actual, &[3; WRAP_NONCE_LEN], ctx).unwrap();
        let aad = with_context(&header[..IMMUTABLE_END], ctx);
        let mut payload = b"forged".to_vec();
        let key = payload_keys(&actual, suite).key;
        let tag = seal_single_use(Backend::default(), suite, &key, &aad, &mut payload).unwrap();
        [&header[..], &payload, &tag].concat()
    }

    #[test]
    fn the_commitment_is_checked_before_the_payload_is_opened() {
        let master = MasterKey::new(1, SecretKey::generate().unwrap());
        let ctx = EncryptionContext::new().with("row", "1");
        for suite in Suite::ALL {
            let record = forged(&master, suite, &ctx.encode().unwrap());
            // Everything but the commitment is consistent...
            let view = RecordView::parse(&record).unwrap();
            let dk = open_wrap(&view.header(), &master, &ctx.encode().unwrap()).unwrap();
            assert_eq!(*dk, [2u8; KEY_LEN], "the wrap opens");
            // ...and yet the record is refused.
            for &backend in Backend::all() {
                assert!(matches!(
                    decrypt_with(backend, &master, &ctx, &record),
                    Err(CryptoError::Decrypt)
                ));
            }
            assert!(check_header(&record, &master, &ctx).is_err());
            // A rewrap carries the mismatch over: it cannot launder the
            // record into one that decrypts, and the check still refuses it.
            let other = MasterKey::new(2, SecretKey::generate().unwrap());
            let moved = rewrap(&record, &master, &other, &ctx).unwrap();
            assert!(matches!(
                decrypt(&other, &ctx, &moved),
                Err(CryptoError::Decrypt)
            ));
            assert!(check_header(&moved, &other, &ctx).is_err());
            // The verified rewrap refuses it instead of moving it.
            assert!(matches!(
                rewrap_verified(&record, &master, &other, &ctx),
                Err(CryptoError::Decrypt)
            ));
        }
    }

    /// `rewrap_verified` succeeds exactly when `decrypt(to, rewrap(..))`
    /// does, and then returns the same bytes: on intact records of every
    /// suite, and with any one byte of a record flipped.
    #[test]
    fn a_verified_rewrap_agrees_with_rewrap_then_decrypt() {
        let v1 = MasterKey::new(1, SecretKey::generate().unwrap());
        let v2 = MasterKey::new(2, SecretKey::generate().unwrap());
        let ctx = EncryptionContext::new().with("row", "1").with("t", "x");
        let other_ctx = EncryptionContext::new().with("row", "2").with("t", "x");
        for suite in Suite::ALL {
            for len in [0usize, 1, 31, 300] {
                let record = encrypt(&v1, suite, &ctx, &vec![9u8; len]).unwrap();
                let plain = rewrap(&record, &v1, &v2, &ctx).unwrap();
                assert_eq!(rewrap_verified(&record, &v1, &v2, &ctx).unwrap(), plain);
                assert_eq!(decrypt(&v2, &ctx, &plain).unwrap(), vec![9u8; len]);
                for i in 0..record.len() {
                    let mut damaged = record.clone();
                    damaged[i] ^= 0x10;
                    let reference = rewrap(&damaged, &v1, &v2, &ctx)
                        .map_err(|_| ())
                        .and_then(|new| decrypt(&v2, &ctx, &new).map(|_| new).map_err(|_| ()));
                    let verified = rewrap_verified(&damaged, &v1, &v2, &ctx).map_err(|_| ());
                    assert_eq!(
                        verified, reference,
                        "{suite:?}, {len} bytes, byte {i} flipped"
                    );
                    assert!(verified.is_err(), "{suite:?}, byte {i} flipped yet moved");
                }
                // The wrong old version or the wrong context: refused.
                assert!(rewrap_verified(&record, &v2, &v1, &ctx).is_err());
                assert!(rewrap_verified(&record, &v1, &v2, &other_ctx).is_err());
            }
        }
    }

    #[test]
    fn commitments_match_only_when_every_byte_does() {
        let a = [0x5au8; COMMITMENT_LEN];
        assert!(commitments_match(&a, &a));
        for i in 0..COMMITMENT_LEN {
            for bit in [0x01, 0x80] {
                let mut b = a;
                b[i] ^= bit;
                assert!(!commitments_match(&a, &b), "byte {i} bit {bit:#x}");
            }
        }
    }
}
