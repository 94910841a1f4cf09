//! Shared setup for the end-to-end tests: a temporary directory with a local
//! KEK, a config file naming a file store, an audit log, and the binary.

#![allow(dead_code, reason = "each test file uses part of the setup")]

use std::path::PathBuf;
use std::sync::Arc;

use assert_cmd::Command;
use keyfold_core::store::FileStore;
use keyfold_core::{Keyring, LocalKek};

/// A directory with `kek.hex`, `config.json` (local KEK, `file://…/store`,
/// audit log `audit.jsonl`) and nothing else.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
}

impl Setup {
    pub(crate) fn new() -> Setup {
        Self::with_settings(serde_json::json!({}))
    }

    /// As [`new`](Self::new), with the config's `keyring` settings.
    pub(crate) fn with_settings(keyring: serde_json::Value) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let setup = Setup { dir };
        setup
            .keyfold()
            .args(["kek", "generate", "--out"])
            .arg(setup.path("kek.hex"))
            .assert()
            .success();
        let config = serde_json::json!({
            "store": format!("file://{}", setup.path("store").display()),
            "kms": {"provider": "local", "kms_key_ref": "test-kek", "kek_file": "kek.hex"},
            "audit_log": setup.path("audit.jsonl").display().to_string(),
            "keyring": keyring,
        });
        std::fs::write(setup.path("config.json"), config.to_string()).expect("config");
        setup
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The binary, with no inherited keyfold settings and a fixed operator.
    pub(crate) fn keyfold(&self) -> Command {
        let mut cmd = Command::cargo_bin("keyfold").expect("binary");
        cmd.env_remove("KEYFOLD_CONFIG")
            .env_remove("KEYFOLD_STORE")
            .env("KEYFOLD_ACTOR", "ops@example.com")
            .current_dir(self.dir.path());
        cmd
    }

    /// The binary with `--config config.json`.
    pub(crate) fn with_config(&self) -> Command {
        let mut cmd = self.keyfold();
        cmd.arg("--config").arg(self.path("config.json"));
        cmd
    }

    /// The binary with `--config config.json --store URL` and `args`.
    pub(crate) fn on_store(&self, url: &str, args: &[&str]) -> Command {
        let mut cmd = self.with_config();
        cmd.args(["--store", url]).args(args);
        cmd
    }

    /// The audit log's events, parsed.
    pub(crate) fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// The audit events' names.
    pub(crate) fn audit_names(&self) -> Vec<String> {
        self.audit()
            .iter()
            .map(|e| e["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The keyring as the library sees it, over the same store and KEK.
    pub(crate) async fn open(&self, id: &str) -> Arc<Keyring> {
        let kek = LocalKek::from_file("test-kek", self.path("kek.hex")).expect("kek");
        let store = FileStore::new(self.path("store")).expect("store");
        Arc::new(
            Keyring::builder(id, Arc::new(kek), Arc::new(store))
                .open()
                .await
                .expect("keyring"),
        )
    }
}

/// stdout of a successful run, parsed as one JSON document.
pub(crate) fn json_of(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Runs `cmd`, checks its exit code (0 for success) and returns its stdout
/// parsed as one JSON document (for `--json` runs).
pub(crate) fn json_run(cmd: &mut Command, code: i32) -> serde_json::Value {
    json_of(cmd.assert().code(code).get_output())
}

/// Polls `check` until it is true, failing after 20 s: far beyond what a
/// change takes to reach an instance (a file store polls every 200 ms,
/// PostgreSQL notifies), so a timeout is a bug, not a slow machine.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 20 s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
