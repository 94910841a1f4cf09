//! Known-answer vectors for the streaming format, kept as data files under
//! `tests/vectors/stream/` and checked in both directions: every success
//! vector decrypts to its plaintext, and encrypting its plaintext with its
//! data key, wrap nonce and nonce prefix gives back its exact bytes. They
//! stay forever, so old objects always decrypt.
//!
//! One file per vector, `name: value` lines (hex for bytes), as the record
//! vectors; `expect:` is `success`, `decrypt-error`, `stream-error NAME` or
//! `format-error NAME`. `KEYFOLD_WRITE_VECTORS=1 cargo test -p keyfold-core
//! vectors` writes missing files (it never overwrites).

use std::io::Read;
use std::path::PathBuf;

use super::write::EncodeCore;
use super::{Decryptor, StreamHeader, seal_header};
use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, StreamError};
use crate::format::secret::{KEY_LEN, MasterKey, SecretKey};
use crate::format::suite::{Backend, Suite, TAG_LEN};
use crate::format::vectors::{Vector, context_text, format_error_name, write_if_missing};
use crate::format::{NONCE_PREFIX_LEN, STREAM_HEADER_LEN, WRAP_NONCE_LEN};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/stream")
}

/// The deterministic encoder: the same code path as `Encryptor`, with
/// chosen secrets.
#[allow(clippy::too_many_arguments, reason = "the vector's inputs")]
fn encode(
    backend: Backend,
    master: &MasterKey,
    suite: Suite,
    segment_size: u32,
    context: &EncryptionContext,
    data_key: &[u8; KEY_LEN],
    nonce: &[u8; WRAP_NONCE_LEN],
    prefix: &[u8; NONCE_PREFIX_LEN],
    plaintext: &[u8],
    write_len: usize,
) -> Vec<u8> {
    let ctx = context.encode().unwrap();
    let (header, mut segments) =
        seal_header(master, suite, segment_size, &ctx, data_key, nonce, prefix).unwrap();
    segments.set_backend(backend);
    let mut core = EncodeCore::from_parts(header, segments);
    let mut out = Vec::new();
    let mut rest = plaintext;
    let mut drain = |core: &mut EncodeCore| loop {
        let pending = core.pending().to_vec();
        if pending.is_empty() {
            break;
        }
        out.extend_from_slice(&pending);
        core.advance(pending.len());
    };
    while !rest.is_empty() {
        drain(&mut core);
        let n = core.accept(&rest[..rest.len().min(write_len)]).unwrap();
        rest = &rest[n..];
    }
    drain(&mut core);
    core.finish().unwrap();
    drain(&mut core);
    out
}

fn decrypt(v: &Vector, object: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let header = StreamHeader::parse(object)?;
    let mut dec = Decryptor::new(
        header,
        &v.master(),
        &v.context(),
        &object[STREAM_HEADER_LEN..],
    )?;
    let mut out = Vec::new();
    dec.read_to_end(&mut out)?;
    Ok(out)
}

fn error_name(e: &CryptoError) -> String {
    match e {
        CryptoError::Decrypt => "decrypt-error".into(),
        CryptoError::Stream(s) => format!(
            "stream-error {}",
            match s {
                StreamError::SegmentSize { .. } => "SegmentSize",
                StreamError::Truncated { .. } => "Truncated",
                StreamError::Segment { .. } => "Segment",
                StreamError::TooLong { .. } => "TooLong",
                _ => "other",
            }
        ),
        CryptoError::Format(f) => format!("format-error {}", format_error_name(f)),
        other => format!("other {other}"),
    }
}

#[test]
fn stream_vectors() {
    if std::env::var_os("KEYFOLD_WRITE_VECTORS").is_some() {
        generate();
    }
    let mut files: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "vectors missing from {:?}", dir());
    for path in files {
        let name = path.display().to_string();
        let v = Vector::parse(&std::fs::read_to_string(&path).unwrap());
        let object = v.hex("object");
        let result = decrypt(&v, &object);
        match v.get("expect") {
            "success" => {
                assert_eq!(result.unwrap(), v.hex("plaintext"), "{name}");
                // Every backend writes the same bytes, whether writes are
                // odd-sized (buffered) or whole (segments sealed straight
                // from the caller's buffer).
                for (&backend, write_len) in Backend::all()
                    .iter()
                    .flat_map(|b| [(b, 37), (b, usize::MAX)])
                {
                    let ours = encode(
                        backend,
                        &v.master(),
                        v.suite(),
                        v.get("segment_size").parse().unwrap(),
                        &v.context(),
                        &v.hex("data_key").try_into().unwrap(),
                        &v.hex("wrap_nonce").try_into().unwrap(),
                        &v.hex("nonce_prefix").try_into().unwrap(),
                        &v.hex("plaintext"),
                        write_len,
                    );
                    assert_eq!(
                        hex::encode(ours),
                        v.get("object"),
                        "{name} {backend:?} writes of {write_len}"
                    );
                }
            }
            want => {
                let err = result.expect_err(&name);
                assert_eq!(error_name(&err), want, "{name}: {err}");
            }
        }
    }
}

struct Case {
    file: &'static str,
    comment: &'static str,
    suite: Suite,
    segment_size: u32,
    version: u32,
    seed: u8,
    ctx: Vec<(&'static str, &'static [u8])>,
    pt: Vec<u8>,
}

/// Builds the vector set from fixed inputs. Only writes missing files.
fn generate() {
    let bytes = |seed: u8, n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let cases = vec![
        Case {
            file: "s1-aes-64-200",
            comment: "AES-256-GCM stream, 64-byte segments, 200 bytes: 3 full segments and a final one of 8",
            suite: Suite::Aes256Gcm,
            segment_size: 64,
            version: 1,
            seed: 1,
            ctx: vec![("tenant", b"acme"), ("object", b"backup-1")],
            pt: bytes(9, 200),
        },
        Case {
            file: "s1-aes-64-128",
            comment: "AES-256-GCM stream, 64-byte segments, 128 bytes: 2 full segments and an empty final one",
            suite: Suite::Aes256Gcm,
            segment_size: 64,
            version: 2,
            seed: 2,
            ctx: vec![("tenant", b"acme")],
            pt: bytes(3, 128),
        },
        Case {
            file: "s1-aes-empty",
            comment: "AES-256-GCM stream, default 64 KiB segments, empty: one empty final segment",
            suite: Suite::Aes256Gcm,
            segment_size: 65536,
            version: 3,
            seed: 3,
            ctx: vec![],
            pt: vec![],
        },
        Case {
            file: "s1-chacha-64-100",
            comment: "ChaCha20-Poly1305 stream, 64-byte segments, 100 bytes",
            suite: Suite::ChaCha20Poly1305,
            segment_size: 64,
            version: 7,
            seed: 4,
            ctx: vec![("tenant", b"acme"), ("object", &[0, 1, 2])],
            pt: bytes(5, 100),
        },
        Case {
            file: "s1-chacha-hello",
            comment: "ChaCha20-Poly1305 stream, default 64 KiB segments, master key version u32::MAX",
            suite: Suite::ChaCha20Poly1305,
            segment_size: 65536,
            version: u32::MAX,
            seed: 5,
            ctx: vec![("object", b"o")],
            pt: b"hello keyfold stream".to_vec(),
        },
    ];
    let out = dir();
    let write = |name: &str, body: String| write_if_missing(&out, name, body);
    let mut base = None;
    for c in &cases {
        let mk = [c.seed.wrapping_mul(3).wrapping_add(1); KEY_LEN];
        let dk: [u8; KEY_LEN] = bytes(c.seed ^ 0x40, KEY_LEN).try_into().unwrap();
        let nonce = [c.seed ^ 0x80; WRAP_NONCE_LEN];
        let prefix: [u8; NONCE_PREFIX_LEN] =
            bytes(c.seed ^ 0xc0, NONCE_PREFIX_LEN).try_into().unwrap();
        let master = MasterKey::new(c.version, SecretKey::try_from_slice(&mk).unwrap());
        let ctx: EncryptionContext = c.ctx.iter().map(|(k, v)| (*k, *v)).collect();
        let object = encode(
            Backend::default(),
            &master,
            c.suite,
            c.segment_size,
            &ctx,
            &dk,
            &nonce,
            &prefix,
            &c.pt,
            37,
        );
        let suite = serde_json::to_value(c.suite).unwrap();
        let common = format!(
            "suite: {}\nsegment_size: {}\nmaster_key_version: {}\nmaster_key: {}\ncontext: {}\n",
            suite.as_str().unwrap(),
            c.segment_size,
            c.version,
            hex::encode(mk),
            context_text(&c.ctx)
        );
        write(
            c.file,
            format!(
                "# {}\nexpect: success\n{common}data_key: {}\nwrap_nonce: {}\nnonce_prefix: {}\nplaintext: {}\nobject: {}\n",
                c.comment,
                hex::encode(dk),
                hex::encode(nonce),
                hex::encode(prefix),
                hex::encode(&c.pt),
                hex::encode(&object)
            ),
        );
        if c.file == "s1-aes-64-200" {
            base = Some((common, object));
        }
    }
    // Negative vectors, all from s1-aes-64-200 (segments of 80 bytes after
    // the 111-byte header: 0..80, 80..160, 160..240, final 240..264).
    let (common, object) = base.unwrap();
    let h = STREAM_HEADER_LEN;
    let full = 64 + TAG_LEN;
    let seg = |i: usize| object[h + i * full..h + (i + 1) * full].to_vec();
    let negative = |file: &str, comment: &str, expect: &str, common: &str, object: &[u8]| {
        write(
            file,
            format!(
                "# {comment}\nexpect: {expect}\n{common}object: {}\n",
                hex::encode(object)
            ),
        );
    };
    negative(
        "s1-neg-cut-boundary",
        "s1-aes-64-200 cut after its third segment: the final segment is missing",
        "stream-error Truncated",
        &common,
        &object[..h + 3 * full],
    );
    negative(
        "s1-neg-cut-header-only",
        "s1-aes-64-200 cut after its header: no segment at all",
        "stream-error Truncated",
        &common,
        &object[..h],
    );
    negative(
        "s1-neg-cut-inside",
        "s1-aes-64-200 cut inside its second segment",
        "stream-error Segment",
        &common,
        &object[..h + full + 40],
    );
    let mut swapped = object[..h].to_vec();
    for i in [0, 2, 1] {
        swapped.extend_from_slice(&seg(i));
    }
    swapped.extend_from_slice(&object[h + 3 * full..]);
    negative(
        "s1-neg-swapped",
        "s1-aes-64-200 with segments 1 and 2 swapped",
        "stream-error Segment",
        &common,
        &swapped,
    );
    let mut dup = object[..h + 2 * full].to_vec();
    dup.extend_from_slice(&seg(1));
    dup.extend_from_slice(&object[h + 2 * full..]);
    negative(
        "s1-neg-duplicated",
        "s1-aes-64-200 with segment 1 duplicated",
        "stream-error Segment",
        &common,
        &dup,
    );
    let mut appended = object.clone();
    appended.push(0);
    negative(
        "s1-neg-appended",
        "s1-aes-64-200 with one byte appended",
        "stream-error Segment",
        &common,
        &appended,
    );
    let mut flipped = object.clone();
    flipped[h + full + 10] ^= 1;
    negative(
        "s1-neg-segment-bit",
        "s1-aes-64-200 with a bit flipped in segment 1",
        "stream-error Segment",
        &common,
        &flipped,
    );
    let mut flipped = object.clone();
    flipped[10] ^= 0x80;
    negative(
        "s1-neg-commitment",
        "s1-aes-64-200 with a commitment bit flipped",
        "decrypt-error",
        &common,
        &flipped,
    );
    let mut flipped = object.clone();
    flipped[STREAM_HEADER_LEN - 20] ^= 1;
    negative(
        "s1-neg-wrapped-key",
        "s1-aes-64-200 with a wrapped data key bit flipped",
        "decrypt-error",
        &common,
        &flipped,
    );
    let mut flipped = object.clone();
    flipped[42] ^= 1;
    negative(
        "s1-neg-nonce-prefix",
        "s1-aes-64-200 with a nonce prefix bit flipped",
        "decrypt-error",
        &common,
        &flipped,
    );
    let mut edited = object.clone();
    edited[36..40].copy_from_slice(&128u32.to_be_bytes());
    negative(
        "s1-neg-segment-size-edited",
        "s1-aes-64-200 with its segment size edited to 128",
        "decrypt-error",
        &common,
        &edited,
    );
    let mut edited = object.clone();
    edited[36..40].copy_from_slice(&1u32.to_be_bytes());
    negative(
        "s1-neg-segment-size-1",
        "a segment size below the minimum",
        "stream-error SegmentSize",
        &common,
        &edited,
    );
    let other_row = common.replace(
        &format!("object={}", hex::encode(b"backup-1")),
        &format!("object={}", hex::encode(b"backup-2")),
    );
    negative(
        "s1-neg-other-object",
        "s1-aes-64-200 decrypted with another object in the context",
        "decrypt-error",
        &other_row,
        &object,
    );
    let mut edited = object.clone();
    edited[3] = 0x01;
    negative(
        "s1-neg-record-suite",
        "a record suite id (0x01) where a stream is expected",
        "format-error UnknownSuite",
        &common,
        &edited,
    );
    let mut edited = object.clone();
    edited[3] = 0x83;
    negative(
        "s1-neg-unknown-stream-suite",
        "an unknown streaming suite id (0x83)",
        "format-error UnknownSuite",
        &common,
        &edited,
    );
}
