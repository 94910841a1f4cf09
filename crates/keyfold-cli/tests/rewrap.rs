//! `keyfold rewrap run|status` over SQLite tables, end to end on the binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Setup, json_run};
use keyfold_core::{EncryptionContext, format};
use rusqlite::{Connection, params};

const TENANT: &str = "acme";

fn context(table: &str, id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", TENANT)
        .with("table", table)
        .with("row", id)
}

/// A database with `secrets` (TEXT ids) and `tokens` (INTEGER ids), `rows`
/// each, encrypted under the active version; a job spec for both.
async fn setup(rows: usize) -> Setup {
    setup_with(rows, serde_json::json!({})).await
}

async fn setup_with(rows: usize, settings: serde_json::Value) -> Setup {
    let s = Setup::with_settings(settings);
    s.with_config()
        .args(["keyring", "create", TENANT])
        .assert()
        .success();
    let ring = s.open(TENANT).await;
    let conn = Connection::open(s.path("app.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE secrets (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, ciphertext BLOB NOT NULL);
         CREATE TABLE tokens (id INTEGER PRIMARY KEY, tenant TEXT, body BLOB NOT NULL);",
    )
    .unwrap();
    for i in 0..rows {
        let id = format!("s{i:05}");
        let ct = ring
            .encrypt(&context("secrets", &id), id.as_bytes())
            .await
            .unwrap();
        conn.execute(
            "INSERT INTO secrets VALUES (?1, ?2, ?3)",
            params![id, TENANT, ct],
        )
        .unwrap();
        // Integer ids that sort differently as text (9 < 10).
        let n = i64::try_from(i * 7 + 3).unwrap();
        let ct = ring
            .encrypt(&context("tokens", &n.to_string()), n.to_string().as_bytes())
            .await
            .unwrap();
        conn.execute(
            "INSERT INTO tokens VALUES (?1, ?2, ?3)",
            params![n, TENANT, ct],
        )
        .unwrap();
    }
    let table = |name: &str, ct: &str| {
        serde_json::json!({"name": name, "id_column": "id", "ciphertext_column": ct,
            "context": {"tenant": {"column": "tenant"}, "table": {"value": name}, "row": {"column": "id"}}})
    };
    let spec = serde_json::json!({"database": "sqlite://app.db", "keyring": TENANT,
        "tables": [table("secrets", "ciphertext"), table("tokens", "body")]});
    std::fs::write(s.path("job.json"), spec.to_string()).unwrap();
    s
}

/// Every row of both tables: (table, id, version, decrypts to its id).
async fn rows(s: &Setup) -> Vec<(String, String, u32, bool)> {
    let ring = s.open(TENANT).await;
    let conn = Connection::open(s.path("app.db")).unwrap();
    let mut out = Vec::new();
    for (table, ct) in [("secrets", "ciphertext"), ("tokens", "body")] {
        let mut stmt = conn
            .prepare(&format!("SELECT CAST(id AS TEXT), {ct} FROM {table}"))
            .unwrap();
        let all: Vec<(String, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (id, ct) in all {
            let version = format::inspect(&ct).unwrap().key_version;
            let ok = ring
                .decrypt(&context(table, &id), &ct)
                .await
                .ok()
                .as_deref()
                == Some(id.as_bytes());
            out.push((table.to_owned(), id, version, ok));
        }
    }
    out
}

#[tokio::test]
async fn run_moves_every_row_and_status_reads_the_job_table() {
    let s = setup(30).await;
    s.with_config()
        .args(["keyring", "rotate", TENANT])
        .assert()
        .success();
    let out = s
        .with_config()
        .args(["rewrap", "run", "--job", "job.json", "--batch-size", "7"])
        .assert()
        .success()
        .get_output()
        .clone();
    // Not a terminal: plain progress lines, no bar.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("batch 1:"), "{text}");
    assert!(text.contains("complete: 60 rewrapped"), "{text}");
    assert!(!text.contains('\u{1b}'), "no terminal escapes: {text}");

    let all = rows(&s).await;
    assert_eq!(all.len(), 60);
    assert!(all.iter().all(|(_, _, v, ok)| *v == 2 && *ok), "{all:?}");

    let json = json_run(
        s.with_config()
            .args(["--json", "rewrap", "status", "--job", "job.json"]),
        0,
    );
    assert_eq!(json["completed"], true);
    assert_eq!(json["target_version"], 2);
    assert_eq!(json["totals"]["rewrapped"], 60);
    assert_eq!(json["tables"][1]["table"], "tokens");

    let names = s.audit_names();
    assert!(
        names.contains(&"kms.rewrap.started".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"kms.rewrap.completed".to_owned()),
        "{names:?}"
    );

    // Evidence for version 1 comes from the finished job; too soon after the
    // rotation, the keyring refuses it (max staleness has not passed).
    let out = s
        .with_config()
        .args([
            "rewrap",
            "status",
            "--job",
            "job.json",
            "--evidence-for",
            "1",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    std::fs::write(s.path("evidence.json"), &out.stdout).unwrap();
    let evidence: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            evidence["keyring_id"].as_str(),
            evidence["version"].as_u64()
        ),
        (Some(TENANT), Some(1))
    );
    s.with_config()
        .args(["keyring", "disable", TENANT, "1", "--yes"])
        .assert()
        .success();
    let out = s
        .with_config()
        .args([
            "keyring",
            "destroy",
            TENANT,
            "1",
            "--evidence",
            "evidence.json",
            "--yes",
        ])
        .assert()
        .code(6)
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("too soon"));
    // No evidence for the target itself.
    s.with_config()
        .args([
            "rewrap",
            "status",
            "--job",
            "job.json",
            "--evidence-for",
            "2",
        ])
        .assert()
        .code(6);
}

#[tokio::test]
async fn ctrl_c_stops_after_the_batch_and_run_resumes_from_the_checkpoint() {
    let s = setup(40).await;
    s.with_config()
        .args(["keyring", "rotate", TENANT])
        .assert()
        .success();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("keyfold"))
        .current_dir(s.dir.path())
        .env("KEYFOLD_ACTOR", "ops@example.com")
        .args([
            "--config",
            "config.json",
            "rewrap",
            "run",
            "--job",
            "job.json",
        ])
        .args(["--batch-size", "4", "--pause-ms", "60000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("batch 1:"), "{first}");
    // The job now waits before batch 2; Ctrl-C ends the wait.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("checkpoint saved")),
        "{rest:?}"
    );

    let json = json_run(
        s.with_config()
            .args(["--json", "rewrap", "status", "--job", "job.json"]),
        0,
    );
    assert_eq!(json["completed"], false);
    assert_eq!(json["batches"], 1);
    assert_eq!(json["totals"]["rewrapped"], 4);
    let job_id = json["job_id"].clone();
    // An unfinished job is no evidence.
    s.with_config()
        .args([
            "rewrap",
            "status",
            "--job",
            "job.json",
            "--evidence-for",
            "1",
        ])
        .assert()
        .code(6);

    let out = s
        .with_config()
        .args([
            "--json",
            "rewrap",
            "run",
            "--job",
            "job.json",
            "--batch-size",
            "50",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let summary: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(summary["job_id"], job_id, "the same job resumed");
    assert_eq!(summary["completed"], true);
    assert_eq!(summary["totals"]["rewrapped"], 80);
    assert_eq!(summary["rewrapped_this_run"], 76);
    assert!(rows(&s).await.iter().all(|(_, _, v, ok)| *v == 2 && *ok));
}

#[tokio::test]
async fn bad_job_specs_are_refused_before_anything_runs() {
    let s = setup(1).await;
    let write =
        |name: &str, v: serde_json::Value| std::fs::write(s.path(name), v.to_string()).unwrap();
    write(
        "nodb.json",
        serde_json::json!({"database": "sqlite://missing.db", "keyring": TENANT,
        "tables": [{"name": "secrets", "id_column": "id", "ciphertext_column": "ciphertext"}]}),
    );
    s.with_config()
        .args(["rewrap", "run", "--job", "nodb.json"])
        .assert()
        .code(5);
    assert!(
        !s.path("missing.db").exists(),
        "no database is created by a typo"
    );
    write(
        "nocol.json",
        serde_json::json!({"database": "sqlite://app.db", "keyring": TENANT,
        "tables": [{"name": "secrets", "id_column": "id", "ciphertext_column": "nope"}]}),
    );
    s.with_config()
        .args(["rewrap", "run", "--job", "nocol.json"])
        .assert()
        .code(2);
    write(
        "mysql.json",
        serde_json::json!({"database": "mysql://u:pw@db/x", "keyring": TENANT,
        "tables": [{"name": "secrets", "id_column": "id", "ciphertext_column": "ciphertext"}]}),
    );
    let out = s
        .with_config()
        .args(["rewrap", "run", "--job", "mysql.json"])
        .assert()
        .code(2)
        .get_output()
        .clone();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("pw@"));
    // A PostgreSQL database that cannot be reached: an error naming it,
    // never its password.
    write(
        "pg.json",
        serde_json::json!({"database": "postgres://u:hunter2@127.0.0.1:1/x", "keyring": TENANT,
        "tables": [{"name": "secrets", "id_column": "id", "ciphertext_column": "ciphertext"}]}),
    );
    let out = s
        .with_config()
        .args(["rewrap", "run", "--job", "pg.json"])
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("hunter2"), "{err}");
    s.with_config()
        .args(["rewrap", "status", "--job", "job.json"])
        .assert()
        .code(5);
}

#[tokio::test]
async fn a_job_run_after_the_disable_is_evidence_that_destroys_the_old_version() {
    // The services' settings, shortened: no staleness, no write window, no grace.
    let s = setup_with(
        5,
        serde_json::json!({"max_staleness_secs": 0, "write_window_secs": 0, "destroy_grace_secs": 0}),
    )
    .await;
    s.with_config()
        .args(["keyring", "rotate", TENANT])
        .assert()
        .success();
    s.with_config()
        .args(["rewrap", "run", "--job", "job.json"])
        .assert()
        .success();
    s.with_config()
        .args(["keyring", "disable", TENANT, "1", "--yes"])
        .assert()
        .success();
    // Evidence must be gathered in a later second than the disable
    // (timestamps are whole seconds): a new job, after it.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = s
        .with_config()
        .args(["--json", "rewrap", "run", "--job", "job.json"])
        .assert()
        .success()
        .get_output()
        .clone();
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let summary: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (
            summary["totals"]["skipped"].as_u64(),
            summary["totals"]["rewrapped"].as_u64()
        ),
        (Some(10), Some(0))
    );
    let out = s
        .with_config()
        .args([
            "rewrap",
            "status",
            "--job",
            "job.json",
            "--evidence-for",
            "1",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    std::fs::write(s.path("evidence.json"), &out.stdout).unwrap();
    s.with_config()
        .args([
            "keyring",
            "destroy",
            TENANT,
            "1",
            "--evidence",
            "evidence.json",
            "--yes",
        ])
        .assert()
        .success();
    let ring = s.open(TENANT).await;
    assert_eq!(
        ring.version_state(1),
        Some(keyfold_core::KeyState::Destroyed)
    );
    let destroy = s.audit().into_iter().last().unwrap();
    assert_eq!(destroy["kind"]["to"], "destroyed");
    assert_eq!(destroy["kind"]["forced"], false);
    assert!(
        destroy["kind"]["detail"]
            .as_str()
            .unwrap()
            .contains("rewrap job")
    );
    assert!(rows(&s).await.iter().all(|(_, _, v, ok)| *v == 2 && *ok));
}
