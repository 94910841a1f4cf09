//! The local KEK wrapper passes the shared conformance suite, and its
//! loaders and `Debug` behave.

use keyfold_core::local::LocalKekError;
use keyfold_core::testkit::{self, Capabilities};
use keyfold_core::{KeyWrapper, LocalKek, SecretKey, WrapContext, WrapErrorKind};

fn kek(id: &str) -> LocalKek {
    LocalKek::from_bytes(id, SecretKey::generate().unwrap())
}

#[tokio::test]
async fn conformance() {
    testkit::run_all(&kek("kek-a"), &kek("kek-b"), Capabilities::default()).await;
}

#[tokio::test]
async fn another_kek_with_the_same_id_fails_authentication() {
    let a = kek("same-id");
    let b = kek("same-id");
    let ctx = WrapContext::new("t", 1);
    let wrapped = a.wrap(&SecretKey::generate().unwrap(), &ctx).await.unwrap();
    let err = b.unwrap(&wrapped, &ctx).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::InvalidCiphertext);
}

#[tokio::test]
async fn another_kek_id_is_a_key_mismatch() {
    let ctx = WrapContext::new("t", 1);
    let wrapped = kek("a")
        .wrap(&SecretKey::generate().unwrap(), &ctx)
        .await
        .unwrap();
    let err = kek("b").unwrap(&wrapped, &ctx).await.unwrap_err();
    assert_eq!(err.kind, WrapErrorKind::KeyMismatch);
    assert!(err.to_string().contains("\"a\""), "{err}");
}

#[test]
fn loads_hex_and_base64_from_env_and_file() {
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let b64 = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
    let a = LocalKek::from_encoded("k", hex).unwrap();
    let b = LocalKek::from_encoded("k", &format!("  {b64}\n")).unwrap();
    // Same key: b unwraps what a wrapped.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = WrapContext::new("t", 3);
        let w = a.wrap(&SecretKey::generate().unwrap(), &ctx).await.unwrap();
        b.unwrap(&w, &ctx).await.unwrap();
    });

    let dir = std::env::temp_dir().join(format!("keyfold-kek-{}", std::process::id()));
    std::fs::write(&dir, hex).unwrap();
    LocalKek::from_file("k", &dir).unwrap();
    std::fs::remove_file(&dir).unwrap();
    assert!(matches!(
        LocalKek::from_file("k", &dir),
        Err(LocalKekError::Io { .. })
    ));
    assert!(matches!(
        LocalKek::from_env("k", "KEYFOLD_TEST_SURELY_UNSET_VAR"),
        Err(LocalKekError::MissingEnv(_))
    ));
    assert!(matches!(
        LocalKek::from_encoded("k", "abcd"),
        Err(LocalKekError::BadEncoding(4))
    ));
    assert!(matches!(
        LocalKek::from_encoded("", hex),
        Err(LocalKekError::BadId)
    ));
}

#[test]
fn debug_never_shows_the_kek() {
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let kek = LocalKek::from_encoded("dev", hex).unwrap();
    let shown = format!(
        "{kek:?} {:?}",
        SecretKey::try_from_slice(&[0xab; 32]).unwrap()
    );
    assert!(shown.contains("******"), "{shown}");
    assert!(!shown.to_lowercase().contains("00112233"), "{shown}");
    assert!(
        !shown.contains("171") && !shown.contains("ab, ab"),
        "{shown}"
    );
}
