//! `keyfold keyring …` and `keyfold probe`, end to end on the binary, over a
//! file store and a local KEK.

mod common;

use common::{Setup, json_of, json_run};
use keyfold_core::KeyState;

#[tokio::test]
async fn create_rotate_show_and_every_change_audited_with_the_operator() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    s.with_config()
        .args(["keyring", "rotate", "acme"])
        .assert()
        .success();

    let json = json_run(
        s.with_config().args(["--json", "keyring", "show", "acme"]),
        0,
    );
    assert_eq!(json["active_version"], 2);
    assert_eq!(json["version_count"], 2);
    assert_eq!(json["versions"][0]["state"], "retired");
    assert_eq!(json["wrap_provider"], "local");

    // The library agrees with what the CLI wrote.
    let ring = s.open("acme").await;
    assert_eq!(ring.active_version(), Some(2));
    assert_eq!(ring.version_state(1), Some(KeyState::Retired));

    let audit = s.audit();
    assert_eq!(
        s.audit_names(),
        ["kms.rotate", "kms.rotate", "kms.version.state_changed"]
    );
    assert!(
        audit.iter().all(|e| e["actor"] == "ops@example.com"),
        "{audit:?}"
    );
    assert!(audit.iter().all(|e| e["keyring_id"] == "acme"));
}

#[test]
fn show_text_needs_no_kms_and_lists_versions() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    // Only a store: reading metadata makes no KMS call.
    let store = format!("file://{}", s.path("store").display());
    let out = s
        .keyfold()
        .args(["--store", &store, "keyring", "show", "acme"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("keyring acme"), "{text}");
    assert!(text.contains("active v1"), "{text}");
    assert!(text.contains("test-kek"), "{text}");
}

#[test]
fn destructive_commands_need_yes_when_stdin_is_not_a_terminal() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    s.with_config()
        .args(["keyring", "rotate", "acme"])
        .assert()
        .success();
    let out = s
        .with_config()
        .args(["keyring", "disable", "acme", "1"])
        .write_stdin("acme\n")
        .assert()
        .code(4)
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let before = s.audit().len();

    s.with_config()
        .args(["keyring", "disable", "acme", "1", "--yes"])
        .assert()
        .success();
    let audit = s.audit();
    assert_eq!(audit.len(), before + 1);
    let last = &audit[before];
    assert_eq!(last["name"], "kms.version.state_changed");
    assert_eq!(
        (last["kind"]["from"].as_str(), last["kind"]["to"].as_str()),
        (Some("retired"), Some("disabled"))
    );

    // Destroy, forced, with its reason in the audit log.
    s.with_config()
        .args([
            "keyring",
            "destroy",
            "acme",
            "1",
            "--force",
            "--reason",
            "INC-7 test",
        ])
        .assert()
        .code(4);
    s.with_config()
        .args([
            "keyring",
            "destroy",
            "acme",
            "1",
            "--force",
            "--reason",
            "INC-7 test",
            "-y",
        ])
        .assert()
        .success();
    let audit = s.audit();
    let destroy = audit.last().unwrap();
    assert_eq!(destroy["kind"]["to"], "destroyed");
    assert_eq!(destroy["kind"]["forced"], true);
    assert_eq!(destroy["kind"]["detail"], "INC-7 test");
}

#[test]
fn lifecycle_refusals_have_their_own_exit_code() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    // The active version cannot be disabled.
    let out = s
        .with_config()
        .args(["--json", "keyring", "disable", "acme", "1", "--yes"])
        .assert()
        .code(6)
        .get_output()
        .clone();
    assert_eq!(json_of(&out)["error"]["kind"], "lifecycle");
    // Creating it twice.
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .code(6);
    // Unknown version and keyring.
    s.with_config()
        .args(["keyring", "enable", "acme", "9"])
        .assert()
        .code(5);
    s.with_config()
        .args(["keyring", "rotate", "nobody"])
        .assert()
        .code(5);
    // Destroy needs evidence or a forced reason.
    s.with_config()
        .args(["keyring", "destroy", "acme", "1", "--yes"])
        .assert()
        .code(2);
    s.with_config()
        .args(["keyring", "destroy", "acme", "1", "--force", "--yes"])
        .assert()
        .code(2);
}

#[test]
fn bad_store_urls_and_missing_config_are_usage_errors() {
    let s = Setup::new();
    for url in [
        "/var/lib/keyfold",
        "s3://bucket/x",
        "file://",
        "mysql://app:hunter2@db/x",
    ] {
        let out = s
            .keyfold()
            .args(["--store", url, "keyring", "show", "acme"])
            .assert()
            .code(2)
            .get_output()
            .clone();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("store"), "{url}: {err}");
        assert!(
            !err.contains("hunter2"),
            "a password in a URL is never printed: {err}"
        );
    }
    // A store directory that does not exist is not silently created.
    let missing = format!("file://{}", s.path("nope").display());
    s.keyfold()
        .args(["--store", &missing, "keyring", "show", "acme"])
        .assert()
        .code(5);
    assert!(!s.path("nope").exists());
    // A change with no KMS configured.
    let store = format!("file://{}", s.path("store").display());
    s.keyfold()
        .args(["--store", &store, "keyring", "rotate", "acme"])
        .assert()
        .code(2);
    // A config file that is not JSON.
    std::fs::write(s.path("bad.json"), "store = 1").unwrap();
    s.keyfold()
        .args(["--config", "bad.json", "keyring", "show", "acme"])
        .assert()
        .code(2);
}

#[test]
fn an_unwritable_audit_log_fails_before_any_change() {
    let s = Setup::new();
    s.with_config()
        .args([
            "--audit-log",
            "no/such/dir/audit.jsonl",
            "keyring",
            "create",
            "acme",
        ])
        .assert()
        .code(1);
    let store = format!("file://{}", s.path("store").display());
    s.keyfold()
        .args(["--store", &store, "keyring", "show", "acme"])
        .assert()
        .code(5);
}

#[test]
fn probe_reports_each_step() {
    let s = Setup::new();
    let json = json_run(s.with_config().args(["--json", "probe"]), 0);
    assert_eq!(json["ok"], true);
    assert_eq!(json["provider"], "local");
    let steps: Vec<_> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].clone())
        .collect();
    assert!(steps.iter().all(|s| s == "ok"), "{steps:?}");

    let text = s
        .with_config()
        .arg("probe")
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("wrap") && text.contains("unwrap") && text.contains("ok"),
        "{text}"
    );
}

#[test]
fn probe_failure_names_the_step_is_audited_and_leaks_no_key() {
    let s = Setup::new();
    // A KEK file that is not a key: the wrapper cannot be built.
    std::fs::write(s.path("bad-kek.hex"), "not hex at all").unwrap();
    let config = serde_json::json!({
        "kms": {"provider": "local", "kms_key_ref": "bad", "kek_file": "bad-kek.hex"},
        "audit_log": s.path("audit.jsonl").display().to_string(),
    });
    std::fs::write(s.path("bad-config.json"), config.to_string()).unwrap();
    let json = json_run(
        s.keyfold()
            .args(["--json", "--config", "bad-config.json", "probe"]),
        7,
    );
    assert_eq!(json["failed_step"], "build");
    assert_eq!(json["error"]["kind"], "kms");
    assert_eq!(s.audit_names(), ["kms.probe.failed"]);

    // A config the validation refuses: validate fails, nothing after it runs.
    let config = serde_json::json!({"kms": {"provider": "aws", "kms_key_ref": "alias/k",
        "region": "eu-west-1", "role_arn": "arn:aws:iam::111122223333:role/k",
        "secret_access_key": "AKIAIOSFODNN7EXAMPLESECRET"}});
    std::fs::write(s.path("static.json"), config.to_string()).unwrap();
    let out = s
        .keyfold()
        .args([
            "--json",
            "--config",
            "static.json",
            "--audit-log",
            "audit.jsonl",
            "probe",
        ])
        .assert()
        .code(2)
        .get_output()
        .clone();
    let json = json_of(&out);
    assert_eq!(json["failed_step"], "validate");
    assert_eq!(json["steps"][1]["status"], "skipped");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("AKIAIOSFODNN7EXAMPLESECRET"), "{all}");

    // The good KEK never shows up anywhere.
    let kek = std::fs::read_to_string(s.path("kek.hex")).unwrap();
    let audit = std::fs::read_to_string(s.path("audit.jsonl")).unwrap();
    assert!(!audit.contains(kek.trim()));
}

#[test]
fn policy_schedule_destroy_and_min_decryption_version() {
    let s = Setup::with_settings(serde_json::json!({"destroy_grace_secs": 3600}));
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    let out = s
        .with_config()
        .args(["--json", "keyring", "policy", "acme"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert!(json_of(&out)["rotation_policy"].is_null());
    let json = json_run(
        s.with_config()
            .args(["--json", "keyring", "policy", "acme", "--period-days", "90"]),
        0,
    );
    assert_eq!(
        (
            json["rotation_policy"]["period_days"].as_u64(),
            json["rotation_policy"]["enabled"].as_bool()
        ),
        (Some(90), Some(true))
    );
    s.with_config()
        .args(["keyring", "policy", "acme", "--off"])
        .assert()
        .success();
    let out = s
        .with_config()
        .args(["keyring", "policy", "acme"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stdout).contains("every 90 day(s), disabled"));
    s.with_config()
        .args(["keyring", "policy", "acme", "--period-days", "0"])
        .assert()
        .code(2);

    for _ in 0..3 {
        s.with_config()
            .args(["keyring", "rotate", "acme"])
            .assert()
            .success();
    }
    // Only a disabled version can be scheduled.
    s.with_config()
        .args(["keyring", "schedule-destroy", "acme", "1", "--yes"])
        .assert()
        .code(6);
    s.with_config()
        .args(["keyring", "disable", "acme", "1", "--yes"])
        .assert()
        .success();
    // Before the grace period ends: refused, saying when it will be allowed.
    let json = json_run(
        s.with_config().args([
            "--json",
            "keyring",
            "schedule-destroy",
            "acme",
            "1",
            "--at",
            "2000-01-01T00:00:00Z",
            "--yes",
        ]),
        6,
    );
    assert_eq!(json["error"]["code"], "destroy_refused");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed from")
    );
    s.with_config()
        .args([
            "keyring",
            "schedule-destroy",
            "acme",
            "1",
            "--at",
            "tomorrow",
            "--yes",
        ])
        .assert()
        .code(2);
    // Default: when allowed; no --yes on a pipe: refused.
    s.with_config()
        .args(["keyring", "schedule-destroy", "acme", "1"])
        .assert()
        .code(4);
    let out = s
        .with_config()
        .args([
            "--json",
            "keyring",
            "schedule-destroy",
            "acme",
            "1",
            "--yes",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    assert!(json_of(&out)["destroy_scheduled_at"].as_u64().is_some());
    assert_eq!(
        s.audit_names().last().map(String::as_str),
        Some("kms.destroy.scheduled")
    );

    // Versions 1 (disabled) and 2, 3 (retired) are below 4: 2 and 3 get disabled.
    s.with_config()
        .args(["keyring", "min-decryption-version", "acme", "4"])
        .assert()
        .code(4);
    let out = s
        .with_config()
        .args([
            "--json",
            "keyring",
            "min-decryption-version",
            "acme",
            "4",
            "--yes",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    assert_eq!(json_of(&out)["disabled"], serde_json::json!([2, 3]));
    let json = json_run(
        s.with_config().args(["--json", "keyring", "show", "acme"]),
        0,
    );
    assert_eq!(json["min_decryption_version"], 4);
    assert_eq!(json["rotation_policy"]["period_days"], 90);
    assert!(
        json["versions"][0]["destroy_scheduled_at"]
            .as_u64()
            .is_some()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_failed_audit_write_after_the_change_exits_8() {
    let s = Setup::new();
    // /dev/full opens, and every write to it fails (ENOSPC).
    let out = s
        .with_config()
        .args([
            "--audit-log",
            "/dev/full",
            "--json",
            "keyring",
            "create",
            "acme",
        ])
        .assert()
        .code(8)
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"created\":true"),
        "the result is still printed: {text}"
    );
    assert!(text.contains("\"kind\":\"audit\""), "{text}");
    // The change stands.
    let store = format!("file://{}", s.path("store").display());
    s.keyfold()
        .args(["--store", &store, "keyring", "show", "acme"])
        .assert()
        .success();
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let s = Setup::new();
    let out = s
        .keyfold()
        .arg("--help")
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit codes:") && text.contains("130 interrupted"),
        "{text}"
    );
    assert!(text.contains("keyfold kek generate --out"), "{text}");
    for sub in [
        &["keyring", "destroy"][..],
        &["rewrap", "run"],
        &["inspect"],
        &["probe"],
    ] {
        let out = s
            .keyfold()
            .args(sub)
            .arg("--help")
            .assert()
            .success()
            .get_output()
            .clone();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Example"), "{sub:?}: {text}");
    }
    // Unknown flags are usage errors (clap's exit code 2).
    s.keyfold()
        .args(["keyring", "show", "--frobnicate"])
        .assert()
        .code(2);
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), a
/// destructive command asks for the keyring id and acts only on it.
#[cfg(target_os = "linux")]
#[test]
fn on_a_terminal_the_operator_confirms_by_typing_the_keyring_id() {
    let s = Setup::new();
    s.with_config()
        .args(["keyring", "create", "acme"])
        .assert()
        .success();
    s.with_config()
        .args(["keyring", "rotate", "acme"])
        .assert()
        .success();
    let bin = assert_cmd::cargo::cargo_bin("keyfold");
    let on_tty = |answer: &str| {
        let command = format!(
            "{} --config {} keyring disable acme 1",
            bin.display(),
            s.path("config.json").display()
        );
        std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .current_dir(s.dir.path())
            .env("KEYFOLD_ACTOR", "ops@example.com")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(answer.as_bytes())?;
                child.wait_with_output()
            })
            .expect("util-linux `script` runs the CLI on a pseudo-terminal")
    };
    let out = on_tty("yes\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Type \"acme\" to confirm"), "{text}");
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert_eq!(s.audit_names().len(), 3, "nothing changed");

    let out = on_tty("acme\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("version 1 disabled"), "{text}");
    assert_eq!(
        s.audit_names().last().map(String::as_str),
        Some("kms.version.state_changed")
    );
}
