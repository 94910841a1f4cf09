//! `keyfold kek generate` and `keyfold inspect`, end to end on the binary.

mod common;

use common::{Setup, json_of, json_run};
use keyfold_core::stream::{self, StreamOptions};
use keyfold_core::{EncryptionContext, MasterKey, SecretKey, Suite, record};

#[test]
fn kek_generate_writes_an_owner_only_hex_key_the_library_reads() {
    let s = Setup::new();
    let path = s.path("kek.hex");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim().len(), 64);
    assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    keyfold_core::LocalKek::from_file("k", &path).expect("LocalKek reads it");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn kek_generate_refuses_to_overwrite() {
    let s = Setup::new();
    let path = s.path("kek.hex");
    let before = std::fs::read(&path).unwrap();
    let out = s
        .keyfold()
        .args(["kek", "generate", "--out"])
        .arg(&path)
        .assert()
        .code(4)
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the KEK is untouched"
    );
}

#[test]
fn kek_generate_json_names_the_file_and_never_the_key() {
    let s = Setup::new();
    let path = s.path("second.hex");
    let out = s
        .keyfold()
        .args(["--json", "kek", "generate", "--out"])
        .arg(&path)
        .assert()
        .success()
        .get_output()
        .clone();
    let json = json_of(&out);
    assert_eq!(json["kek_file"], path.display().to_string());
    let key = std::fs::read_to_string(&path).unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(key.trim()));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(key.trim()));
}

fn record_file(s: &Setup, name: &str, version: u32, plaintext: &[u8]) -> std::path::PathBuf {
    let key = MasterKey::new(version, SecretKey::generate().unwrap());
    let ct = record::encrypt(&key, Suite::default(), &EncryptionContext::new(), plaintext).unwrap();
    let path = s.path(name);
    std::fs::write(&path, ct).unwrap();
    path
}

fn stream_file(s: &Setup, name: &str, segment: u32, len: usize) -> std::path::PathBuf {
    let key = MasterKey::new(9, SecretKey::generate().unwrap());
    let mut out = Vec::new();
    let options = StreamOptions::default()
        .suite(Suite::ChaCha20Poly1305)
        .segment_size(segment);
    stream::encrypt(
        &key,
        options,
        &EncryptionContext::new(),
        &vec![7u8; len][..],
        &mut out,
    )
    .unwrap();
    let path = s.path(name);
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn inspect_a_record_as_text_and_json() {
    let s = Setup::new();
    let path = record_file(&s, "r.kf", 7, b"hello world");
    let text = s.keyfold().arg("inspect").arg(&path).assert().success();
    let text = String::from_utf8_lossy(&text.get_output().stdout).into_owned();
    assert!(text.contains("keyfold record v1"), "{text}");
    assert!(text.contains("master key version: 7"), "{text}");
    assert!(text.contains("11 bytes of plaintext"), "{text}");

    let json = json_run(s.keyfold().args(["inspect", "--json"]).arg(&path), 0);
    assert_eq!(json["kind"], "record");
    assert_eq!(json["format_version"], 1);
    assert_eq!(json["suite"], "aes-256-gcm");
    assert_eq!(json["key_version"], 7);
    assert_eq!(json["header_len"], 100);
    assert_eq!(json["plaintext_len"], 11);
    assert_eq!(json["total_len"], 11 + 116);
    assert!(json["segments"].is_null());
}

#[test]
fn inspect_a_stream_from_stdin_counts_segments() {
    let s = Setup::new();
    // 3 full segments of 64 bytes and 10 bytes more: 4 segments.
    let path = stream_file(&s, "s.kf", 64, 3 * 64 + 10);
    let json = json_run(
        s.keyfold()
            .args(["--json", "inspect", "-"])
            .pipe_stdin(&path)
            .unwrap(),
        0,
    );
    assert_eq!(json["kind"], "stream");
    assert_eq!(json["suite"], "chacha20-poly1305");
    assert_eq!(json["key_version"], 9);
    assert_eq!(json["header_len"], 111);
    assert_eq!(json["segment_size"], 64);
    assert_eq!(json["segments"], 4);
    assert_eq!(json["plaintext_len"], 3 * 64 + 10);

    // An exact multiple ends with an empty final segment.
    let path = stream_file(&s, "s2.kf", 64, 128);
    let out = s
        .keyfold()
        .args(["--json", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    let json = json_of(&out);
    assert_eq!(
        (json["segments"].as_u64(), json["plaintext_len"].as_u64()),
        (Some(3), Some(128))
    );
}

#[test]
fn inspect_refuses_what_is_not_a_keyfold_ciphertext() {
    let s = Setup::new();
    let junk = s.path("junk.txt");
    std::fs::write(
        &junk,
        "just some text, not a ciphertext at all, long enough for a header? no",
    )
    .unwrap();
    let out = s
        .keyfold()
        .arg("inspect")
        .arg(&junk)
        .assert()
        .code(3)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a keyfold ciphertext") && err.contains("magic"),
        "{err}"
    );

    let empty = s.path("empty");
    std::fs::write(&empty, b"").unwrap();
    s.keyfold().arg("inspect").arg(&empty).assert().code(3);

    // --json: the error is a JSON object on stdout.
    let json = json_run(s.keyfold().args(["--json", "inspect"]).arg(&junk), 3);
    assert_eq!(json["error"]["kind"], "not_ciphertext");
    assert_eq!(json["error"]["exit_code"], 3);
}

#[test]
fn inspect_refuses_truncated_records_and_streams() {
    let s = Setup::new();
    let path = record_file(&s, "r.kf", 1, b"abc");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [1, 50, 101, 115] {
        let cut_path = s.path(&format!("cut{cut}"));
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let out = s
            .keyfold()
            .arg("inspect")
            .arg(&cut_path)
            .assert()
            .code(3)
            .get_output()
            .clone();
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a keyfold ciphertext"));
    }
    let path = stream_file(&s, "s.kf", 64, 100);
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the last segment's tag: fewer than 16 bytes after the last whole segment.
    let cut_path = s.path("scut");
    std::fs::write(&cut_path, &bytes[..111 + 80 + 5]).unwrap();
    let out = s
        .keyfold()
        .arg("inspect")
        .arg(&cut_path)
        .assert()
        .code(3)
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
}

#[test]
fn inspect_a_missing_file_is_not_found() {
    let s = Setup::new();
    s.keyfold()
        .args(["inspect", "no-such-file"])
        .assert()
        .code(5);
}

#[test]
fn inspect_a_header_alone() {
    let s = Setup::new();
    let record = std::fs::read(record_file(&s, "r.kf", 4, b"abc")).unwrap();
    let stream = std::fs::read(stream_file(&s, "s.kf", 64, 10)).unwrap();
    for (bytes, kind, len) in [
        (&record[..100], "record", 100),
        (&stream[..111], "stream", 111),
    ] {
        let path = s.path(&format!("{kind}.header"));
        std::fs::write(&path, bytes).unwrap();
        let out = s
            .keyfold()
            .args(["--json", "inspect"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let json = json_of(&out);
        assert_eq!(json["kind"], kind);
        assert_eq!(json["header_only"], true);
        assert_eq!(json["header_len"], len);
        assert!(json["plaintext_len"].is_null());
    }
}
