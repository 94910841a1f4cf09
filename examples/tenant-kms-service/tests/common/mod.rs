//! Test support: a service on a free loopback port with a temporary SQLite
//! file and local KEK, driven over HTTP with reqwest.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support shared by several test binaries"
)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tenant_kms_service::config::{Database, KekSource, RewrapConfig, ServiceConfig, TenantConfig};
use tenant_kms_service::stepup::StepUpConfig;
use tenant_kms_service::tenants::Providers;
use tenant_kms_service::{RunningService, start};

pub const ACME: &str = "acme-admin-token-0123456789";
pub const GLOBEX: &str = "globex-admin-token-0123456789";

/// The TOTP step the tests' services use: short, so a test needing several
/// step-up tokens (one per code) waits seconds, not minutes; at least 2 s so
/// a code computed just before a step boundary is still accepted (skew 1).
pub const TOTP_STEP_SECS: u64 = 2;

/// The tenant a bearer token belongs to.
pub fn tenant_of(token: &str) -> &'static str {
    match token {
        ACME => "acme",
        GLOBEX => "globex",
        other => panic!("no tenant for token {other:?}"),
    }
}

/// A tenant admin's authenticator: the enrolled secret and the last TOTP
/// step it used (the service accepts each step's code once).
pub struct Authenticator {
    pub totp: totp_rs::Totp,
    pub last_step: Option<u64>,
}

impl Authenticator {
    pub fn from_base32(b32: &str) -> Authenticator {
        let secret = totp_rs::Secret::try_from_base32(b32).unwrap();
        Authenticator {
            totp: totp_rs::Builder::new()
                .with_secret(secret)
                .with_step_duration(TOTP_STEP_SECS)
                .build()
                .unwrap(),
            last_step: None,
        }
    }

    /// The code for `step`.
    pub fn code_at(&self, step: u64) -> String {
        self.totp.generate(step * TOTP_STEP_SECS).to_string()
    }

    /// A code not used before: this step's, or the next one's, or (after
    /// both were used) the one after, waiting for the clock to get there.
    pub async fn next_code(&mut self) -> String {
        self.code_from(0).await
    }

    /// A code not used before, of at least `ahead` steps from now (0 or 1):
    /// the service takes a code until two steps after its own, so one of the
    /// next step stays good for at least two more steps.
    pub async fn code_from(&mut self, ahead: u64) -> String {
        loop {
            let now = unix_secs() / TOTP_STEP_SECS;
            let step = self
                .last_step
                .map_or(now + ahead, |l| (l + 1).max(now + ahead));
            if step <= now + 1 {
                self.last_step = Some(step);
                return self.code_at(step);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Authenticators by (database, bearer token): a restarted service on the
/// same database enrols nothing new, and the admins keep theirs.
static AUTHENTICATORS: Mutex<Option<HashMap<(Database, String), Authenticator>>> = Mutex::new(None);

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tenant-kms-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config over `dir`: KEK `dev-kek` (generated), tenants acme and globex,
/// batches of `batch_size` every 20 ms.
pub fn config(dir: &TempDir, batch_size: usize, max_batches: Option<u64>) -> ServiceConfig {
    let kek = dir.0.join("kek.hex");
    for file in [kek.clone(), dir.0.join("kek-2.hex")] {
        if !file.exists() {
            std::fs::write(&file, keyfold::LocalKek::generate_hex().unwrap().as_bytes()).unwrap();
        }
    }
    ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        database: Database::Sqlite(dir.0.join("service.sqlite3")),
        local_keks: BTreeMap::from([
            ("dev-kek".to_owned(), KekSource::File(kek)),
            (
                "dev-kek-2".to_owned(),
                KekSource::File(dir.0.join("kek-2.hex")),
            ),
            (
                "broken-kek".to_owned(),
                KekSource::File(dir.0.join("missing-kek.hex")),
            ),
        ]),
        tenants: vec![
            TenantConfig {
                id: "acme".into(),
                admin: "admin@acme.example".into(),
                token: ACME.into(),
            },
            TenantConfig {
                id: "globex".into(),
                admin: "admin@globex.example".into(),
                token: GLOBEX.into(),
            },
        ],
        rewrap: RewrapConfig {
            batch_size,
            interval: Duration::from_millis(20),
            max_batches,
            retry_base: Duration::from_millis(50),
            ..RewrapConfig::default()
        },
        step_up: StepUpConfig {
            totp_step: Duration::from_secs(TOTP_STEP_SECS),
            ..StepUpConfig::default()
        },
        provider_endpoints: BTreeMap::new(),
        // One instance per database here: no settle time before a destroy
        // (lazy_rewrap_on_read keeps keyfold's default).
        max_staleness: Duration::ZERO,
        // Destroy right after the disable (keyfold's default is 24 h).
        destroy_grace: Duration::ZERO,
        // Each write is checked against it just before it is stored.
        write_window: Duration::from_secs(1),
        maintenance_interval: Some(Duration::from_millis(100)),
    }
}

pub fn local_providers(config: &ServiceConfig) -> Providers {
    Providers::local(config.local_keks.clone())
}

/// A running service and a client for it.
pub struct Service {
    pub running: Option<RunningService>,
    pub base: String,
    pub http: reqwest::Client,
    pub database: Database,
}

impl Service {
    /// Starts the service; the second factors it enrols are kept as the
    /// admins' authenticators (each tenant must be enrolled by the first
    /// start on a database).
    pub async fn start(config: ServiceConfig, providers: Providers) -> Service {
        let database = config.database.clone();
        let tokens: HashMap<String, String> = config
            .tenants
            .iter()
            .map(|t| (t.id.clone(), t.token.clone()))
            .collect();
        let mut running = start(config, providers).await.unwrap();
        {
            let mut all = AUTHENTICATORS.lock().unwrap();
            let all = all.get_or_insert_with(HashMap::new);
            for e in std::mem::take(&mut running.enrolments) {
                assert!(
                    e.otpauth_uri.starts_with("otpauth://totp/"),
                    "{}",
                    e.otpauth_uri
                );
                assert!(e.otpauth_uri.contains(&e.secret_base32));
                all.insert(
                    (database.clone(), tokens[&e.tenant].clone()),
                    Authenticator::from_base32(&e.secret_base32),
                );
            }
            for token in tokens.values() {
                assert!(
                    all.contains_key(&(database.clone(), token.clone())),
                    "a tenant was not enrolled on its first start"
                );
            }
        }
        let base = format!("http://{}", running.addr);
        Service {
            running: Some(running),
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            database,
        }
    }

    /// Where the service serves `/metrics`.
    pub fn metrics_url(&self) -> String {
        let at = self
            .running
            .as_ref()
            .and_then(|r| r.metrics_addr)
            .expect("the tests' config asks for metrics");
        format!("http://{at}/metrics")
    }

    /// A fresh TOTP code of the admin with bearer `token`.
    pub async fn code(&self, token: &str) -> String {
        self.code_from(token, 0).await
    }

    /// A fresh TOTP code that stays good for at least two more TOTP steps,
    /// for a test that sends one code several times.
    pub async fn lasting_code(&self, token: &str) -> String {
        self.code_from(token, 1).await
    }

    async fn code_from(&self, token: &str, ahead: u64) -> String {
        // Taken out of the registry while waiting (no lock across .await).
        let key = (self.database.clone(), token.to_owned());
        let mut auth = AUTHENTICATORS
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .remove(&key)
            .expect("an authenticator");
        let code = auth.code_from(ahead).await;
        AUTHENTICATORS
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .insert(key, auth);
        code
    }

    /// A wrong code for the admin with bearer `token` (never a valid one).
    pub fn wrong_code(&self, token: &str) -> String {
        let all = AUTHENTICATORS.lock().unwrap();
        let auth = &all.as_ref().unwrap()[&(self.database.clone(), token.to_owned())];
        let now = unix_secs() / TOTP_STEP_SECS;
        let valid: Vec<String> = (now.saturating_sub(2)..=now + 2)
            .map(|s| auth.code_at(s))
            .collect();
        (0..)
            .map(|n| format!("{:06}", (123_456 + n * 7_919) % 1_000_000))
            .find(|c| !valid.contains(c))
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }

    /// Sends a request; returns the status and the JSON body (Null if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        step_up: Option<&str>,
        body: Option<RawBody>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(s) = step_up {
            req = req.header("x-step-up-token", s);
        }
        match body {
            Some(RawBody::Json(v)) => req = req.json(&v),
            Some(RawBody::Text(t)) => {
                req = req.header("content-type", "application/json").body(t);
            }
            None => {}
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text}"))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            path,
            Some(token),
            None,
            Some(RawBody::Json(body)),
        )
        .await
    }

    pub async fn put_secret(&self, token: &str, name: &str, value: &str) -> Value {
        let (s, v) = self
            .call(
                Method::PUT,
                &format!("/secrets/{name}"),
                Some(token),
                None,
                Some(RawBody::Json(json!({ "value": value }))),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn get_secret(&self, token: &str, name: &str) -> Value {
        let (s, v) = self.get(&format!("/secrets/{name}"), token).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    pub async fn onboard_local(&self, token: &str) -> Value {
        let (s, v) = self
            .onboard(
                token,
                json!({ "provider": "local", "kms_key_ref": "dev-kek" }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// `POST /admin/tenant-kms` with a step-up token for the body's key.
    pub async fn onboard(&self, token: &str, body: Value) -> (StatusCode, Value) {
        let key_ref = body["kms_key_ref"].as_str().unwrap_or_default().to_owned();
        let su = self.step_up(token, "onboard", &key_ref).await;
        self.call(
            Method::POST,
            "/admin/tenant-kms",
            Some(token),
            Some(&su),
            Some(RawBody::Json(body)),
        )
        .await
    }

    /// Exchanges a fresh code for a step-up token for `action` on `target`.
    pub async fn step_up(&self, token: &str, action: &str, target: &str) -> String {
        let mut tries = 0;
        loop {
            let code = self.code(token).await;
            let (s, v) = self
                .post(
                    "/admin/auth/step-up",
                    token,
                    json!({ "code": code, "action": action, "target": target }),
                )
                .await;
            // A machine so loaded that the request reached the service more
            // than a TOTP step after the code was computed: one more code.
            if s == StatusCode::UNAUTHORIZED && tries == 0 {
                tries += 1;
                continue;
            }
            assert_eq!(s, StatusCode::OK, "{v}");
            return v["step_up_token"].as_str().unwrap().to_owned();
        }
    }

    pub async fn rotate(&self, token: &str) -> Value {
        let su = self.step_up(token, "rotate", tenant_of(token)).await;
        let (s, v) = self
            .call(
                Method::POST,
                "/admin/tenant-kms/rotate",
                Some(token),
                Some(&su),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    pub async fn version_op(&self, token: &str, version: u32, op: &str) -> (StatusCode, Value) {
        let action = if op == "schedule-destroy" {
            "destroy"
        } else {
            op
        };
        let su = self.step_up(token, action, &version.to_string()).await;
        self.call(
            Method::POST,
            &format!("/admin/tenant-kms/versions/{version}/{op}"),
            Some(token),
            Some(&su),
            None,
        )
        .await
    }

    /// Destroys `version`, retrying while the keyring refuses evidence
    /// gathered too soon after the version's retirement (other instances
    /// may still encrypt under it for the keyring's maximum staleness).
    pub async fn destroy(&self, token: &str, version: u32) -> (StatusCode, Value) {
        poll_every("destroy to settle", Duration::from_millis(250), || async {
            let (s, v) = self.version_op(token, version, "destroy").await;
            let too_soon = v["error"] == "destroy_refused"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("too soon"));
            (!too_soon).then_some((s, v))
        })
        .await
    }

    pub async fn rewrap(&self, token: &str) -> Value {
        let (s, v) = self.get("/admin/tenant-kms/rewrap", token).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Polls the rewrap status until `done` holds, for at most 60 s.
    pub async fn wait_rewrap(&self, token: &str, done: impl Fn(&Value) -> bool) -> Value {
        poll("rewrap progress", || async {
            let v = self.rewrap(token).await;
            done(&v).then_some(v)
        })
        .await
    }

    /// The rewrap status once the job `lease` names has stopped running
    /// (completed, incomplete or failed).
    pub async fn settled_job(&self, token: &str, lease: &str) -> Value {
        self.wait_rewrap(token, |v| v["job_id"] == lease && v["status"] != "running")
            .await
    }

    /// [`settled_job`](Self::settled_job), which must have completed.
    pub async fn completed_job(&self, token: &str, lease: &str) -> Value {
        let v = self.settled_job(token, lease).await;
        assert_eq!(v["status"], "completed", "{v}");
        v
    }

    pub async fn audit(&self, token: &str) -> Vec<Value> {
        let (s, v) = self.get("/admin/audit", token).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["events"].as_array().unwrap().clone()
    }
}

pub enum RawBody {
    Json(Value),
    Text(&'static str),
}

/// Polls `f` until it gives a value, with a 90 s deadline (a deadline, not
/// a pace: the test passes as soon as the condition holds).
pub async fn poll<T, F, Fut>(what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_every(what, Duration::from_millis(20), f).await
}

/// [`poll`], trying every `every`, for at most 90 s.
pub async fn poll_every<T, F, Fut>(what: &str, every: Duration, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// Names of the audit events, in order.
pub fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// The SQLite file of a test `config`.
pub fn sqlite_path(config: &ServiceConfig) -> PathBuf {
    match &config.database {
        Database::Sqlite(path) => path.clone(),
        other => panic!("not a SQLite config: {other:?}"),
    }
}

/// The SQLite database of a test `config`, opened beside the service.
pub fn sqlite_db(config: &ServiceConfig) -> tenant_kms_service::db::SqliteDb {
    tenant_kms_service::db::SqliteDb::open(&sqlite_path(config)).unwrap()
}

/// A fresh database on the PostgreSQL server of `KEYFOLD_PG_URL` (which
/// scripts/test-all starts), as a URL; panics saying what to do when the
/// variable is unset (tests never skip).
#[cfg(feature = "postgres")]
pub async fn postgres_database(hint: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let server = std::env::var("KEYFOLD_PG_URL").unwrap_or_else(|_| {
        panic!(
            "KEYFOLD_PG_URL is not set: this test needs a PostgreSQL server. Start a throwaway \
             one with `eval \"$(scripts/setup-postgres)\"` from the repository root \
             (scripts/test-all does)."
        )
    });
    let name = format!(
        "tks_{hint}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = sqlx::PgPool::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to KEYFOLD_PG_URL ({e}): is the server up?"));
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&sql).execute(&admin).await.unwrap();
    }
    admin.close().await;
    let (base, _) = server.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// The test config of `config`, on a fresh PostgreSQL database.
#[cfg(feature = "postgres")]
pub async fn postgres_config(
    dir: &TempDir,
    batch_size: usize,
    max_batches: Option<u64>,
) -> ServiceConfig {
    let mut c = config(dir, batch_size, max_batches);
    c.database = Database::Postgres(postgres_database("svc").await);
    c
}

/// Onboarding stores the config and the re-wrapped keyring in one
/// transaction, on the database of `cfg`: with the config write failing
/// (`fault(true)` makes it fail, `fault(false)` mends it) a move to
/// `dev-kek-2` changes nothing, not even after a restart, and without the
/// fault it goes through and survives a restart.
pub async fn check_onboarding_is_one_transaction<F, Fut>(cfg: &ServiceConfig, fault: F)
where
    F: Fn(bool) -> Fut,
    Fut: Future<Output = ()>,
{
    let move_to_kek_2 = json!({ "provider": "local", "kms_key_ref": "dev-kek-2" });
    let svc = Service::start(cfg.clone(), local_providers(cfg)).await;
    svc.onboard_local(ACME).await;
    svc.put_secret(ACME, "s", "before").await;

    fault(true).await;
    let (s, v) = svc.onboard(ACME, move_to_kek_2.clone()).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"], "internal");
    let text = v.to_string();
    assert!(
        !text.contains("disk on fire") && !text.contains("tenant_kms"),
        "internal detail leaked: {v}"
    );
    assert!(
        v["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    let keys_under = |meta: &Value, key: &str| {
        assert_eq!(meta["kms_key_ref"], key, "{meta}");
        for k in meta["keys"].as_array().unwrap() {
            assert_eq!(k["wrap_key_ref"], key, "{meta}");
        }
    };
    keys_under(&svc.get("/admin/tenant-kms", ACME).await.1, "dev-kek");
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "before");
    svc.stop().await;

    // After a restart the stored config and keyring still agree.
    let svc = Service::start(cfg.clone(), local_providers(cfg)).await;
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "before");
    fault(false).await;
    let (s, v) = svc.onboard(ACME, move_to_kek_2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    svc.stop().await;
    let svc = Service::start(cfg.clone(), local_providers(cfg)).await;
    keys_under(&svc.get("/admin/tenant-kms", ACME).await.1, "dev-kek-2");
    assert_eq!(svc.get_secret(ACME, "s").await["value"], "before");
    svc.stop().await;
}
