//! `keyfold keyring seal` and `keyring unseal`, end to end on the binary,
//! over a file store and a local KEK: the seal is stored with the keyring,
//! so the library (another instance) refuses while it holds, and an unseal
//! lets it work again.

mod common;

use common::{Setup, eventually, json_run};
use keyfold_core::{EncryptionContext, Error};

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("row", "1")
}

#[tokio::test]
async fn seal_stops_the_library_and_the_cli_until_unseal() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    // A service instance, opened before the seal, with a key in its cache.
    let service = s.open("acme").await;
    let record = service.encrypt(&ctx(), b"row one").await.unwrap();
    assert_eq!(service.decrypt(&ctx(), &record).await.unwrap(), b"row one");

    // Without --yes and no terminal: refused, nothing sealed.
    s.with_config()
        .args([
            "keyring",
            "seal",
            "acme",
            "--reason",
            "INC-42: token leaked",
        ])
        .assert()
        .code(4);
    assert!(s.open("acme").await.operator_seal_info().is_none());

    let json = json_run(
        s.with_config().args([
            "--json",
            "keyring",
            "seal",
            "acme",
            "--reason",
            "INC-42: token leaked",
            "--yes",
        ]),
        0,
    );
    assert_eq!(json["sealed"], true);
    assert_eq!(json["already_sealed"], false);
    assert_eq!(json["operator_seal"]["reason"], "INC-42: token leaked");
    assert_eq!(json["operator_seal"]["actor"], "ops@example.com");
    let since = json["operator_seal"]["since"].as_str().unwrap().to_owned();
    assert!(since.ends_with('Z') && since.contains('T'), "{since}");

    // A new instance refuses at once; the running one once it sees the
    // change (its file store polls the directory), with the key cached.
    let fresh = s.open("acme").await;
    assert!(matches!(
        fresh.decrypt(&ctx(), &record).await,
        Err(Error::SealedByOperator { reason, .. }) if reason == "INC-42: token leaked"
    ));
    eventually("the running instance refuses", || async {
        matches!(
            service.decrypt(&ctx(), &record).await,
            Err(Error::SealedByOperator { .. })
        )
    })
    .await;

    // Through the CLI: a rotation is refused with the lifecycle exit code.
    let err = json_run(
        s.with_config()
            .args(["--json", "keyring", "rotate", "acme"]),
        6,
    );
    assert_eq!(err["error"]["code"], "sealed_by_operator");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("INC-42: token leaked")
    );

    // `show` displays it, as text and as JSON.
    let out = s
        .with_config()
        .args(["keyring", "show", "acme"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SEALED BY AN OPERATOR"), "{text}");
    assert!(text.contains("INC-42: token leaked"), "{text}");
    assert!(text.contains("ops@example.com"), "{text}");
    let shown = json_run(
        s.with_config().args(["--json", "keyring", "show", "acme"]),
        0,
    );
    assert_eq!(shown["operator_seal"]["reason"], "INC-42: token leaked");
    assert_eq!(shown["operator_seal"]["since"], since.as_str());

    // Sealing again keeps the first seal.
    let json = json_run(
        s.with_config().args([
            "--json", "keyring", "seal", "acme", "--reason", "again", "--yes",
        ]),
        0,
    );
    assert_eq!(json["already_sealed"], true);
    assert_eq!(json["operator_seal"]["reason"], "INC-42: token leaked");

    // Unseal (no confirmation: it only lifts a protection the operator put).
    let json = json_run(
        s.with_config().args([
            "--json",
            "--actor",
            "lead@example.com",
            "keyring",
            "unseal",
            "acme",
        ]),
        0,
    );
    assert_eq!(json["sealed"], false);
    assert_eq!(json["lifted"]["reason"], "INC-42: token leaked");

    eventually("the running instance decrypts again", || async {
        service.decrypt(&ctx(), &record).await.is_ok()
    })
    .await;
    assert_eq!(service.decrypt(&ctx(), &record).await.unwrap(), b"row one");
    s.with_config()
        .args(["keyring", "rotate", "acme"])
        .assert()
        .success();

    // Audited, with the operators as actors.
    let audit = s.audit();
    let sealed: Vec<_> = audit
        .iter()
        .filter(|e| e["name"] == "kms.sealed.manual")
        .collect();
    assert_eq!(sealed.len(), 1, "{audit:?}");
    assert_eq!(sealed[0]["actor"], "ops@example.com");
    assert_eq!(sealed[0]["kind"]["reason"], "INC-42: token leaked");
    let unsealed: Vec<_> = audit
        .iter()
        .filter(|e| e["name"] == "kms.unsealed")
        .collect();
    assert_eq!(unsealed.len(), 1, "{audit:?}");
    assert_eq!(unsealed[0]["actor"], "lead@example.com");
}

#[test]
fn seal_needs_a_reason_and_no_kms() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    for args in [
        &["--json", "keyring", "seal", "acme", "--yes"][..],
        &[
            "--json", "keyring", "seal", "acme", "--reason", "  ", "--yes",
        ][..],
    ] {
        let json = json_run(s.with_config().args(args), 2);
        assert_eq!(json["error"]["kind"], "usage", "{args:?}");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--reason"),
            "{json}"
        );
    }
    // Nothing was sealed or audited by the refusals.
    assert!(!s.audit_names().iter().any(|n| n == "kms.sealed.manual"));

    // Only a store (no KMS): sealing and unsealing need no KMS call.
    let store = format!("file://{}", s.path("store").display());
    let audit = s.path("audit.jsonl");
    let bare = |args: &[&str]| {
        let mut cmd = s.keyfold();
        cmd.args(["--store", &store, "--audit-log"])
            .arg(&audit)
            .args(args);
        cmd
    };
    bare(&["keyring", "seal", "acme", "--reason", "drill", "--yes"])
        .assert()
        .success();
    bare(&["keyring", "rotate", "acme"]).assert().code(2);
    bare(&["keyring", "unseal", "acme"]).assert().success();
    // Unknown keyring: not found.
    bare(&["keyring", "seal", "nobody", "--reason", "x", "--yes"])
        .assert()
        .code(5);
    // Unseal of a keyring that is not sealed needs the KMS to probe.
    bare(&["keyring", "unseal", "acme"]).assert().code(7);
    s.with_config()
        .args(["keyring", "unseal", "acme"])
        .assert()
        .success();
}
