//! Three service processes on one PostgreSQL database (`--database
//! postgres://…`; the server of `KEYFOLD_PG_URL`, which scripts/test-all
//! starts): a rotation on one, a disable on another, and reads on the third
//! refuse the disabled version within a second; the rewrap job runs once
//! across the three (shards shared, each row moved once), and killing one
//! with SIGKILL mid-job loses nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Authenticator, TempDir, poll};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ACME: &str = "fleet-acme-admin-token-0123456789";
const GLOBEX: &str = "fleet-globex-admin-token-0123456789";

/// One service process.
struct Instance {
    child: Child,
    base: String,
    pid: u32,
    /// The TOTP secrets it enrolled (the first start on the database).
    secrets: Vec<(String, String)>,
}

/// Starts `tenant-kms-service --config FILE --database URL` and waits until
/// it listens.
async fn spawn(dir: &TempDir, config: &Value, url: &str) -> Instance {
    let file = dir.0.join(format!("config-{}.json", rand_suffix()));
    std::fs::write(&file, config.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenant-kms-service"))
        .arg("--config")
        .arg(&file)
        .arg("--database")
        .arg(url)
        .env("ACME_TOKEN", ACME)
        .env("GLOBEX_TOKEN", GLOBEX)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut secrets = Vec::new();
    let mut tenant = None;
    // Enrolments come on stdout before the listening line on stderr.
    let base = loop {
        assert!(Instant::now() < deadline, "instance {pid} never listened");
        tokio::select! {
            line = stdout.next_line() => {
                let Some(line) = line.unwrap() else { continue };
                enrolment(&line, &mut tenant, &mut secrets);
            }
            line = stderr.next_line() => {
                let Some(line) = line.unwrap() else {
                    panic!("instance {pid} exited before listening: {:?}", child.try_wait());
                };
                if let Some(addr) = line.strip_prefix("tenant-kms-service listening on ") {
                    break addr.to_owned();
                }
            }
        }
    };
    // Enrolments printed before the listening line may still be in the
    // stdout pipe: read what comes within a moment.
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_millis(500), stdout.next_line()).await
    {
        enrolment(&line, &mut tenant, &mut secrets);
    }
    // Keep draining its output (the operator log) so it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
    Instance {
        child,
        base,
        pid,
        secrets,
    }
}

/// Reads one stdout line of the enrolment message (`tenant ID: …`, then
/// `(secret BASE32)`) into `secrets`.
fn enrolment(line: &str, tenant: &mut Option<String>, secrets: &mut Vec<(String, String)>) {
    if let Some(rest) = line.strip_prefix("tenant ") {
        *tenant = rest.split(':').next().map(str::to_owned);
    }
    if let Some(secret) = line.trim().strip_prefix("(secret ") {
        let owner = tenant
            .clone()
            .expect("a secret line follows its tenant line");
        secrets.push((owner, secret.trim_end_matches(')').to_owned()));
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The fleet's clients: HTTP and each admin's authenticator.
struct Admins {
    http: reqwest::Client,
    acme: Authenticator,
    globex: Authenticator,
}

impl Admins {
    fn auth(&mut self, token: &str) -> &mut Authenticator {
        if token == ACME {
            &mut self.acme
        } else {
            &mut self.globex
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        at: &Instance,
        path: &str,
        token: &str,
        step_up: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", at.base))
            .bearer_auth(token);
        if let Some(s) = step_up {
            req = req.header("x-step-up-token", s);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A step-up token from `at` (tokens are in the shared database: any
    /// instance accepts them).
    async fn step_up(&mut self, at: &Instance, token: &str, action: &str, target: &str) -> String {
        for _ in 0..2 {
            let code = self.auth(token).next_code().await;
            let (s, v) = self
                .call(
                    reqwest::Method::POST,
                    at,
                    "/admin/auth/step-up",
                    token,
                    None,
                    Some(json!({ "code": code, "action": action, "target": target })),
                )
                .await;
            if s == StatusCode::OK {
                return v["step_up_token"].as_str().unwrap().to_owned();
            }
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        }
        panic!("no step-up token");
    }

    async fn admin_op(
        &mut self,
        at: &Instance,
        token: &str,
        (action, target): (&str, &str),
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let su = self.step_up(at, token, action, target).await;
        let (s, v) = self
            .call(reqwest::Method::POST, at, path, token, Some(&su), body)
            .await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        v
    }

    async fn put(&self, at: &Instance, token: &str, name: &str, value: &str) {
        let (s, v) = self
            .call(
                reqwest::Method::PUT,
                at,
                &format!("/secrets/{name}"),
                token,
                None,
                Some(json!({ "value": value })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }

    async fn get(&self, at: &Instance, token: &str, name: &str) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::GET,
            at,
            &format!("/secrets/{name}"),
            token,
            None,
            None,
        )
        .await
    }
}

fn config(rewrap_on: bool) -> Value {
    json!({
        "listen": "127.0.0.1:0",
        "database": "unused.sqlite3",
        "local_keks": { "dev-kek": { "file": "kek.hex" } },
        "tenants": [
            { "id": "acme", "admin": "admin@acme.example", "token_env": "ACME_TOKEN" },
            { "id": "globex", "admin": "admin@globex.example", "token_env": "GLOBEX_TOKEN" }
        ],
        "rewrap": if rewrap_on {
            json!({ "batch_size": 10, "interval_ms": 20, "shards_per_source": 4, "shard_lease_secs": 2 })
        } else {
            json!({ "max_batches": 0 })
        },
        // Only notifications can make a disable reach another instance
        // within a second.
        "max_staleness_secs": 30,
        "totp_step_secs": common::TOTP_STEP_SECS,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_database_share_disables_and_the_rewrap_job() {
    let dir = TempDir::new("fleet");
    std::fs::write(
        dir.0.join("kek.hex"),
        keyfold::LocalKek::generate_hex().unwrap().as_bytes(),
    )
    .unwrap();
    let url = common::postgres_database("fleet").await;

    // ---- A disable on one instance reaches another's reads within a second.
    let cfg = config(false);
    let first = spawn(&dir, &cfg, &url).await;
    let second = spawn(&dir, &cfg, &url).await;
    let third = spawn(&dir, &cfg, &url).await;
    assert!(second.secrets.is_empty() && third.secrets.is_empty());
    let secret_of = |tenant: &str| {
        first
            .secrets
            .iter()
            .find(|(t, _)| t == tenant)
            .map(|(_, s)| Authenticator::from_base32(s))
            .unwrap()
    };
    let mut admins = Admins {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        acme: secret_of("acme"),
        globex: secret_of("globex"),
    };
    let onboard = json!({ "provider": "local", "kms_key_ref": "dev-kek" });
    let old = admins
        .admin_op(
            &first,
            ACME,
            ("onboard", "dev-kek"),
            "/admin/tenant-kms",
            Some(onboard.clone()),
        )
        .await["new_key_version"]
        .as_u64()
        .unwrap();
    // Written and read on the third (its key cache is warm).
    for i in 0..60 {
        admins.put(&third, ACME, &format!("a{i}"), "before").await;
    }
    assert_eq!(admins.get(&third, ACME, "a0").await.0, StatusCode::OK);
    let new = admins
        .admin_op(
            &first,
            ACME,
            ("rotate", "acme"),
            "/admin/tenant-kms/rotate",
            None,
        )
        .await["version"]
        .as_u64()
        .unwrap();
    assert!(new > old);
    admins
        .admin_op(
            &second,
            ACME,
            ("disable", &old.to_string()),
            &format!("/admin/tenant-kms/versions/{old}/disable"),
            None,
        )
        .await;
    let disabled_at = Instant::now();
    // Each read is of another record still under the old version (a read
    // that succeeds may move its record to the new one).
    let mut refused_after = None;
    for i in 1..60 {
        let (s, v) = admins.get(&third, ACME, &format!("a{i}")).await;
        if s != StatusCode::OK {
            assert!(v["error"].is_string(), "{s}: {v}");
            refused_after = Some(disabled_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused_after = refused_after.expect("the third instance kept decrypting the old version");
    assert!(
        refused_after < Duration::from_secs(1),
        "the disable took {refused_after:?} to reach the third instance"
    );
    // Enabled again on the third: the first decrypts again.
    admins
        .admin_op(
            &third,
            ACME,
            ("enable", &old.to_string()),
            &format!("/admin/tenant-kms/versions/{old}/enable"),
            None,
        )
        .await;
    poll("the enable to reach the first instance", || async {
        (admins.get(&first, ACME, "a59").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    // An operator's seal on the first stops the second within a second; an
    // unseal on the third frees the first again.
    let (s, v) = admins
        .call(
            reqwest::Method::POST,
            &first,
            "/admin/tenant-kms/seal",
            ACME,
            None,
            Some(json!({ "reason": "INC-7: token leaked" })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let sealed_at = Instant::now();
    let refused = poll("the seal to reach the second instance", || async {
        let (s, v) = admins.get(&second, ACME, "a59").await;
        (s != StatusCode::OK).then_some((sealed_at.elapsed(), v))
    })
    .await;
    assert!(
        refused.0 < Duration::from_secs(1),
        "the seal took {:?} to reach the second instance: {}",
        refused.0,
        refused.1
    );
    assert!(refused.1.to_string().contains("seal"), "{}", refused.1);
    admins
        .admin_op(
            &third,
            ACME,
            ("unseal", "acme"),
            "/admin/tenant-kms/unseal",
            None,
        )
        .await;
    poll("the unseal to reach the first instance", || async {
        (admins.get(&first, ACME, "a59").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    for mut i in [first, second, third] {
        i.child.kill().await.unwrap();
    }

    // ---- The rewrap job, shared by three instances, one killed mid-job.
    let cfg = config(true);
    let first = spawn(&dir, &cfg, &url).await;
    let second = spawn(&dir, &cfg, &url).await;
    let mut third = spawn(&dir, &cfg, &url).await;
    let old = admins
        .admin_op(
            &first,
            GLOBEX,
            ("onboard", "dev-kek"),
            "/admin/tenant-kms",
            Some(onboard),
        )
        .await["new_key_version"]
        .as_u64()
        .unwrap();
    let instances = [&first, &second, &third];
    let rows = 600;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(20) {
        let mut writes = Vec::new();
        for &i in chunk {
            let at = instances[i % 3];
            let admins = &admins;
            writes.push(async move {
                admins
                    .put(at, GLOBEX, &format!("g{i}"), &format!("v1-{i}"))
                    .await;
                // A third of them twice: the first value goes to the
                // history table, which the job moves too.
                if i % 3 == 0 {
                    admins
                        .put(at, GLOBEX, &format!("g{i}"), &format!("v2-{i}"))
                        .await;
                }
            });
        }
        futures::future::join_all(writes).await;
    }
    // Every row of the tenant locked: each lane that claims a shard stalls
    // on its first batch's write, shard held, so the third instance surely
    // holds an unfinished shard when it is killed (however fast or slow
    // this machine is).
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut hold = pool.begin().await.unwrap();
    for table in ["tks_secrets", "tks_secret_versions"] {
        sqlx::query(&format!(
            "SELECT 1 FROM {table} WHERE tenant = 'globex' FOR UPDATE"
        ))
        .execute(&mut *hold)
        .await
        .unwrap();
    }
    let new = admins
        .admin_op(
            &second,
            GLOBEX,
            ("rotate", "globex"),
            "/admin/tenant-kms/rotate",
            None,
        )
        .await;
    let job_id = new["rewrap_lease_id"].as_str().unwrap().to_owned();
    let target = new["version"].as_u64().unwrap();
    assert!(target > old);

    // Kill the third once it holds a shard of the job, then let the rows go.
    let third_name = format!("tenant-kms-service-{}", third.pid);
    poll("the third instance to claim a shard", || async {
        let owners: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT owner FROM keyfold_rewrap_shards WHERE job_id = $1 AND NOT done",
        )
        .bind(&job_id)
        .fetch_all(&pool)
        .await
        .unwrap();
        owners
            .iter()
            .any(|o| o.as_deref() == Some(third_name.as_str()))
            .then_some(())
    })
    .await;
    third.child.kill().await.unwrap();
    hold.rollback().await.unwrap();

    let status = poll("the job to complete", || async {
        let (s, v) = admins
            .call(
                reqwest::Method::GET,
                &first,
                "/admin/tenant-kms/rewrap",
                GLOBEX,
                None,
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        (v["status"] != "running").then_some(v)
    })
    .await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["job_id"], job_id.as_str());
    assert_eq!(status["totals"]["failed"], 0, "{status}");

    // Every row, current and history, is on the target, and every secret
    // reads its last value on a surviving instance.
    let versions: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT ciphertext FROM tks_secrets WHERE tenant = 'globex'
         UNION ALL SELECT ciphertext FROM tks_secret_versions WHERE tenant = 'globex'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let total = rows + rows.div_ceil(3);
    assert_eq!(versions.len(), total);
    for ct in &versions {
        assert_eq!(
            u64::from(keyfold::format::inspect(ct).unwrap().key_version),
            target
        );
    }
    for i in (0..rows).step_by(7) {
        let expected = if i % 3 == 0 {
            format!("v2-{i}")
        } else {
            format!("v1-{i}")
        };
        let (s, v) = admins.get(&first, GLOBEX, &format!("g{i}")).await;
        assert_eq!(
            (s, v["value"].as_str()),
            (StatusCode::OK, Some(expected.as_str()))
        );
    }

    // Shared: the shards were claimed by more than one instance, the killed
    // one's shard was taken over, and each row was counted once (moved once,
    // or found moved by the instance that took over).
    let shards: Vec<(Option<String>, i32)> =
        sqlx::query_as("SELECT owner, claims FROM keyfold_rewrap_shards WHERE job_id = $1")
            .bind(&job_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    let owners: BTreeSet<_> = shards.iter().filter_map(|(o, _)| o.clone()).collect();
    assert!(owners.len() >= 2, "one instance did it all: {shards:?}");
    assert!(
        shards.iter().any(|(_, claims)| *claims >= 2),
        "no shard was taken over from the killed instance: {shards:?}"
    );
    let seen = status["totals"]["seen"].as_u64().unwrap();
    let rewrapped = status["totals"]["rewrapped"].as_u64().unwrap();
    assert_eq!(seen, total as u64, "{status}");
    assert!(rewrapped <= total as u64, "{status}");
    // The audit log every instance wrote is one intact chain, and an edit
    // by someone who can switch the trigger off is found.
    let db = tenant_kms_service::db::postgres::PgDb::open(&url)
        .await
        .unwrap();
    assert_eq!(db.verify_audit().await.unwrap(), None);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM tks_audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(events > 10, "{events} audit rows");
    let refused = sqlx::query("UPDATE tks_audit_log SET actor = 'someone else' WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("append-only"), "{refused}");
    sqlx::raw_sql(
        "ALTER TABLE tks_audit_log DISABLE TRIGGER USER;
         UPDATE tks_audit_log SET actor = 'someone else' WHERE seq = 3;",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        db.verify_audit().await.unwrap(),
        Some(tenant_kms_service::db::postgres::AuditTamper::Edited { seq: 3 })
    );
    pool.close().await;
    for mut i in [first, second] {
        i.child.kill().await.unwrap();
    }
}
