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

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tenant_kms_service::config::{KekSource, RewrapConfig, ServiceConfig, TenantConfig};
use tenant_kms_service::tenants::Providers;
use tenant_kms_service::{RunningService, start};

pub const ACME: &str = "acme-admin-token-0123456789";
pub const GLOBEX: &str = "globex-admin-token-0123456789";

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
    if !kek.exists() {
        std::fs::write(&kek, keyfold::LocalKek::generate_hex().unwrap().as_bytes()).unwrap();
    }
    ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: dir.0.join("service.sqlite3"),
        local_keks: BTreeMap::from([
            ("dev-kek".to_owned(), KekSource::File(kek)),
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
        },
        step_up_ttl: Duration::from_secs(300),
        // One instance per database here: no settle time before a destroy
        // (lazy_rewrap_on_read keeps keyfold's default).
        max_staleness: Duration::ZERO,
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
}

impl Service {
    pub async fn start(config: ServiceConfig, providers: Providers) -> Service {
        let running = start(config, providers).await.unwrap();
        let base = format!("http://{}", running.addr);
        Service {
            running: Some(running),
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
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
            .post(
                "/admin/tenant-kms",
                token,
                json!({ "provider": "local", "kms_key_ref": "dev-kek" }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    pub async fn step_up(&self, token: &str) -> String {
        let (s, v) = self.post("/admin/auth/step-up", token, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["step_up_token"].as_str().unwrap().to_owned()
    }

    pub async fn rotate(&self, token: &str) -> Value {
        let su = self.step_up(token).await;
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
        let su = self.step_up(token).await;
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
