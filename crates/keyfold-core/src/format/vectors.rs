//! Known-answer vectors for record format v1, kept as data files under
//! `tests/vectors/` and checked in both directions: each success vector must
//! decrypt to its plaintext, and encrypting its plaintext with its data key
//! and wrap nonce must give back its exact record bytes. Vectors of every
//! released format stay forever, so old ciphertext always decrypts.
//!
//! One file per vector, `name: value` lines (hex for bytes); `expect:` is
//! `success`, `decrypt-error` or `format-error NAME`.
//! `KEYFOLD_WRITE_VECTORS=1 cargo test -p keyfold-core vectors` writes the
//! generated set when a file is missing (it never overwrites).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::format::WRAP_NONCE_LEN;
use crate::format::context::EncryptionContext;
use crate::format::error::{CryptoError, FormatError};
use crate::format::record::{decrypt_with, seal_with};
use crate::format::secret::{KEY_LEN, MasterKey, SecretKey};
use crate::format::suite::Suite;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// One vector file: `name: value` lines (shared with the stream vectors).
pub(crate) struct Vector {
    fields: BTreeMap<String, String>,
}

impl Vector {
    pub(crate) fn parse(text: &str) -> Vector {
        let fields = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once(':').expect("name: value");
                (k.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Vector { fields }
    }
    pub(crate) fn get(&self, k: &str) -> &str {
        self.fields.get(k).unwrap_or_else(|| panic!("missing {k}"))
    }
    pub(crate) fn hex(&self, k: &str) -> Vec<u8> {
        hex::decode(self.get(k)).unwrap()
    }
    pub(crate) fn key(&self, k: &str) -> [u8; KEY_LEN] {
        self.hex(k).try_into().unwrap()
    }
    pub(crate) fn master(&self) -> MasterKey {
        MasterKey::new(
            self.get("master_key_version").parse().unwrap(),
            SecretKey::from_bytes(&mut self.key("master_key")),
        )
    }
    pub(crate) fn context(&self) -> EncryptionContext {
        let text = self.get("context");
        text.split(';')
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap();
                (k.to_owned(), hex::decode(v).unwrap())
            })
            .collect()
    }
    pub(crate) fn suite(&self) -> Suite {
        serde_json::from_value(serde_json::Value::String(self.get("suite").into())).unwrap()
    }
}

pub(crate) fn format_error_name(e: &FormatError) -> &'static str {
    match e {
        FormatError::TooShort { .. } => "TooShort",
        FormatError::BadMagic => "BadMagic",
        FormatError::UnknownVersion(_) => "UnknownVersion",
        FormatError::UnknownSuite(_) => "UnknownSuite",
        FormatError::LengthExceeds { .. } => "LengthExceeds",
        FormatError::TrailingData(_) => "TrailingData",
    }
}

/// A context as a vector file writes it: `key=hex;key=hex`.
pub(crate) fn context_text(c: &[(&str, &[u8])]) -> String {
    c.iter()
        .map(|(k, v)| format!("{k}={}", hex::encode(v)))
        .collect::<Vec<_>>()
        .join(";")
}

/// Writes `dir/name.txt` unless it exists: released vectors never change.
pub(crate) fn write_if_missing(dir: &std::path::Path, name: &str, body: String) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{name}.txt"));
    if !path.exists() {
        std::fs::write(path, body).unwrap();
    }
}

#[test]
fn vectors() {
    if std::env::var_os("KEYFOLD_WRITE_VECTORS").is_some() {
        generate();
    }
    let mut files: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "vectors missing from {:?}", dir());
    for path in files {
        // Every vector on every backend: their output must be byte-identical.
        for &backend in crate::format::suite::Backend::all() {
            let name = format!("{} ({backend:?})", path.display());
            let v = Vector::parse(&std::fs::read_to_string(&path).unwrap());
            check(&v, backend, &name);
        }
    }
}

fn check(v: &Vector, backend: crate::format::suite::Backend, name: &str) {
    let record = v.hex("record");
    let result = decrypt_with(backend, &v.master(), &v.context(), &record);
    match v.get("expect") {
        "success" => {
            assert_eq!(result.unwrap(), v.hex("plaintext"), "{name}");
            // The other direction: same inputs, same bytes.
            let ctx = v.context().encode().unwrap();
            let nonce: [u8; WRAP_NONCE_LEN] = v.hex("wrap_nonce").try_into().unwrap();
            let ours = seal_with(
                backend,
                &v.master(),
                v.suite(),
                &ctx,
                &v.key("data_key"),
                &nonce,
                &v.hex("plaintext"),
            )
            .unwrap();
            assert_eq!(hex::encode(ours), v.get("record"), "{name}");
        }
        "decrypt-error" => assert!(
            matches!(result, Err(CryptoError::Decrypt)),
            "{name}: {result:?}"
        ),
        other => {
            let want = other.strip_prefix("format-error ").expect("known expect");
            match result {
                Err(CryptoError::Format(e)) => assert_eq!(format_error_name(&e), want, "{name}"),
                r => panic!("{name}: expected format error {want}, got {r:?}"),
            }
        }
    }
}

/// Builds the vector set from fixed inputs. Only writes missing files.
fn generate() {
    let mk = |b: u8| [b; KEY_LEN].map(|x| x.wrapping_mul(3).wrapping_add(1));
    let dk = |b: u8| {
        let mut k = [0u8; KEY_LEN];
        for (i, x) in k.iter_mut().enumerate() {
            *x = b ^ (i as u8);
        }
        k
    };
    let nonce = |b: u8| [b; WRAP_NONCE_LEN];
    struct Case<'a> {
        file: &'a str,
        comment: &'a str,
        suite: Suite,
        version: u32,
        mk: u8,
        dk: u8,
        nonce: u8,
        ctx: Vec<(&'a str, &'a [u8])>,
        pt: Vec<u8>,
    }
    let cases = vec![
        Case {
            file: "v1-aes-empty",
            comment: "AES-256-GCM, empty plaintext, empty context",
            suite: Suite::Aes256Gcm,
            version: 1,
            mk: 1,
            dk: 2,
            nonce: 3,
            ctx: vec![],
            pt: vec![],
        },
        Case {
            file: "v1-aes-hello",
            comment: "AES-256-GCM with a tenant/row context",
            suite: Suite::Aes256Gcm,
            version: 1,
            mk: 1,
            dk: 4,
            nonce: 5,
            ctx: vec![("tenant", b"acme"), ("row", b"42")],
            pt: b"hello keyfold".to_vec(),
        },
        Case {
            file: "v1-chacha-100",
            comment: "ChaCha20-Poly1305, 100 bytes",
            suite: Suite::ChaCha20Poly1305,
            version: 7,
            mk: 9,
            dk: 6,
            nonce: 7,
            ctx: vec![
                ("tenant", b"acme"),
                ("table", b"secrets"),
                ("row", &[0, 0, 0, 1]),
            ],
            pt: (0..100).collect(),
        },
        Case {
            file: "v1-aes-maxversion",
            comment: "AES-256-GCM, master key version u32::MAX, 1 KiB",
            suite: Suite::Aes256Gcm,
            version: u32::MAX,
            mk: 11,
            dk: 8,
            nonce: 9,
            ctx: vec![("tenant", b"t")],
            pt: (0..1024u32).map(|i| (i * 7) as u8).collect(),
        },
        Case {
            file: "v1-chacha-empty-ctx",
            comment: "ChaCha20-Poly1305, empty context",
            suite: Suite::ChaCha20Poly1305,
            version: 2,
            mk: 12,
            dk: 10,
            nonce: 11,
            ctx: vec![],
            pt: b"x".to_vec(),
        },
    ];
    let out = dir();
    let write = |name: &str, body: String| write_if_missing(&out, name, body);
    let mut hello = None;
    for c in &cases {
        let master = MasterKey::new(c.version, SecretKey::from_bytes(&mut mk(c.mk)));
        let ctx: EncryptionContext = c.ctx.iter().map(|(k, v)| (*k, *v)).collect();
        let record = seal_with(
            crate::format::suite::Backend::default(),
            &master,
            c.suite,
            &ctx.encode().unwrap(),
            &dk(c.dk),
            &nonce(c.nonce),
            &c.pt,
        )
        .unwrap();
        let suite = serde_json::to_value(c.suite).unwrap();
        let common = format!(
            "suite: {}\nmaster_key_version: {}\nmaster_key: {}\ncontext: {}\n",
            suite.as_str().unwrap(),
            c.version,
            hex::encode(mk(c.mk)),
            context_text(&c.ctx)
        );
        write(
            c.file,
            format!(
                "# {}\nexpect: success\n{common}data_key: {}\nwrap_nonce: {}\nplaintext: {}\nrecord: {}\n",
                c.comment,
                hex::encode(dk(c.dk)),
                hex::encode(nonce(c.nonce)),
                hex::encode(&c.pt),
                hex::encode(&record)
            ),
        );
        if c.file == "v1-aes-hello" {
            hello = Some((common, record));
        }
    }
    let (common, record) = hello.unwrap();
    let negative = |file: &str, comment: &str, expect: &str, common: &str, record: &[u8]| {
        write(
            file,
            format!(
                "# {comment}\nexpect: {expect}\n{common}record: {}\n",
                hex::encode(record)
            ),
        );
    };
    let mut r = record.clone();
    let last = r.len() - 20;
    r[last] ^= 1;
    negative(
        "v1-neg-payload-bit",
        "v1-aes-hello with one payload bit flipped",
        "decrypt-error",
        &common,
        &r,
    );
    let moved = common.replace(
        &format!("row={}", hex::encode(b"42")),
        &format!("row={}", hex::encode(b"43")),
    );
    negative(
        "v1-neg-other-row",
        "v1-aes-hello decrypted with another row in the context",
        "decrypt-error",
        &moved,
        &record,
    );
    let mut r = record.clone();
    r[39] = 2;
    let v2 = common.replace("master_key_version: 1", "master_key_version: 2");
    negative(
        "v1-neg-version-edited",
        "v1-aes-hello with its master key version field edited to 2",
        "decrypt-error",
        &v2,
        &r,
    );
    let mut r = record.clone();
    r[10] ^= 0x80;
    negative(
        "v1-neg-commitment",
        "v1-aes-hello with a commitment bit flipped",
        "decrypt-error",
        &common,
        &r,
    );
    let mut r = record.clone();
    r[70] ^= 1;
    negative(
        "v1-neg-wrapped-key",
        "v1-aes-hello with a wrapped data key bit flipped",
        "decrypt-error",
        &common,
        &r,
    );
    let mut r = record.clone();
    r[2] = 2;
    negative(
        "v1-neg-format-2",
        "format version 2 (unknown to v1 readers)",
        "format-error UnknownVersion",
        &common,
        &r,
    );
    let mut r = record.clone();
    r[3] = 0x81;
    negative(
        "v1-neg-streaming-suite",
        "a streaming suite id (0x81) where a record is expected",
        "format-error UnknownSuite",
        &common,
        &r,
    );
    negative(
        "v1-neg-truncated",
        "v1-aes-hello cut inside the header",
        "format-error TooShort",
        &common,
        &record[..100],
    );
    negative(
        "v1-neg-magic",
        "bad magic",
        "format-error BadMagic",
        &common,
        b"PK\x03\x04 not keyfold",
    );
}
