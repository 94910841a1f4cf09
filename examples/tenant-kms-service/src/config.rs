//! The service's configuration: a JSON file (`--config PATH` or
//! `TENANT_KMS_CONFIG`), or, with neither, a development setup made on first
//! start in `./tenant-kms-data` (a fresh local KEK and a random admin token
//! per demo tenant, written to `dev-tokens.env`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::stepup::StepUpConfig;

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where to listen (loopback by default; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Where to serve `/metrics` (Prometheus text format), for the
    /// operator's scraper only: its own listener, never the tenants' port,
    /// and no bearer token (bind it to a private address). `None`: no
    /// metrics page.
    pub metrics_listen: Option<SocketAddr>,
    /// The database: a SQLite file (the default) or a PostgreSQL URL.
    pub database: Database,
    /// Local KEKs tenants may onboard with `{"provider": "local", "kms_key_ref": ID}`:
    /// id → the KEK's source. The service owns them; a request never names a file.
    pub local_keks: BTreeMap<String, KekSource>,
    /// The tenants and their admins' bearer tokens.
    pub tenants: Vec<TenantConfig>,
    /// The background rewrap task.
    pub rewrap: RewrapConfig,
    /// Step-up: token lifetime, TOTP step, rate limit.
    pub step_up: StepUpConfig,
    /// Operator endpoint overrides per provider (`aws` → a KMS VPC endpoint),
    /// applied to the provider factories by `main`. Tenants can never name
    /// an endpoint.
    pub provider_endpoints: BTreeMap<String, String>,
    /// How stale an instance's view of a keyring may be when it encrypts
    /// (keyfold's default, 30 s); a version can be destroyed only this long
    /// after its retirement. Use the same value on every instance.
    pub max_staleness: Duration,
    /// How long a version stays disabled before it may be destroyed
    /// (keyfold's default, 24 h; docs/LIFECYCLE.md).
    pub destroy_grace: Duration,
    /// How long after encrypting a record the service may still persist it
    /// without re-checking its version (keyfold's default, 60 s; the
    /// service encrypts just before writing). A destroy's evidence must be
    /// gathered at least this long after the version's retirement.
    pub write_window: Duration,
    /// Runs every maintenance task this often instead of keyfold's
    /// defaults (rotation policy hourly, scheduled destroys every minute,
    /// unseal probes every second, cache sweeps every minute). For tests.
    pub maintenance_interval: Option<Duration>,
}

/// The service's database.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Database {
    /// A SQLite file: one instance (or several on one machine).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://` or `postgresql://`): a fleet of
    /// instances on one database. The URL may hold a password: `Debug`
    /// never shows it.
    Postgres(String),
}

impl Database {
    /// A `postgres://` or `postgresql://` URL (any case), or else a
    /// SQLite path.
    ///
    /// # Errors
    /// Another URL (`scheme://…`): it is neither, and taking it for a file
    /// name would print it, password and all.
    pub fn parse(text: &str) -> Result<Database, String> {
        let scheme = text
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Database::Postgres(text.to_owned())),
            Some(other) => Err(format!(
                "database: a {other}:// URL is not supported (a SQLite path or a postgres:// URL)"
            )),
            None => Ok(Database::Sqlite(PathBuf::from(text))),
        }
    }

    /// What to show in logs: the path, or the URL without its user info
    /// and query (which may carry a password).
    pub fn redacted(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(url) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
                let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
                format!("{scheme}://{rest}")
            }
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Database::Postgres(_) => f.debug_tuple("Postgres").field(&self.redacted()).finish(),
        }
    }
}

/// Where a local KEK comes from (hex or base64, 32 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KekSource {
    /// A file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

/// One tenant. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantConfig {
    /// Tenant id (also its keyring id).
    pub id: String,
    /// The admin's name, recorded as the actor of their changes.
    pub admin: String,
    /// The admin's bearer token.
    pub token: String,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig")
            .field("id", &self.id)
            .field("admin", &self.admin)
            .field("token", &"******")
            .finish()
    }
}

/// The background rewrap task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapConfig {
    /// Rows per batch, interleaved across the two secret tables (default 100).
    pub batch_size: usize,
    /// Pause between batches (default 5 s).
    pub interval: Duration,
    /// Stop driving jobs after this many batches in this process (`None`:
    /// never). For draining an instance before shutdown, and for tests; the
    /// job resumes from its checkpoint on the next start.
    pub max_batches: Option<u64>,
    /// The first retry of a row that failed comes this long after; each
    /// later one twice as long (at most an hour). Default 5 s.
    pub retry_base: Duration,
    /// PostgreSQL: shards per secret table of a new distributed job
    /// (default 16; more shards than instances balances the work).
    pub shards_per_source: u32,
    /// PostgreSQL: how long an instance holds a shard without finishing a
    /// batch before another instance takes it over (default 30 s): the
    /// longest a killed instance's share of a job waits.
    pub shard_lease: Duration,
}

impl Default for RewrapConfig {
    fn default() -> Self {
        RewrapConfig {
            batch_size: 100,
            interval: Duration::from_secs(5),
            max_batches: None,
            retry_base: Duration::from_secs(5),
            shards_per_source: 16,
            shard_lease: Duration::from_secs(30),
        }
    }
}

/// The config file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    /// A SQLite path (relative to the file) or a `postgres://` URL.
    database: String,
    #[serde(default)]
    local_keks: BTreeMap<String, KekSource>,
    tenants: Vec<FileTenant>,
    #[serde(default)]
    rewrap: FileRewrap,
    #[serde(default = "default_step_up_secs")]
    step_up_ttl_secs: u64,
    #[serde(default = "default_totp_step_secs")]
    totp_step_secs: u64,
    #[serde(default = "default_max_failures")]
    step_up_max_failures: u32,
    #[serde(default)]
    provider_endpoints: BTreeMap<String, String>,
    #[serde(default = "default_staleness_secs")]
    max_staleness_secs: u64,
    #[serde(default = "default_destroy_grace_secs")]
    destroy_grace_secs: u64,
    #[serde(default = "default_write_window_secs")]
    write_window_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    id: String,
    admin: String,
    /// Name of the environment variable holding the admin's token.
    token_env: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRewrap {
    batch_size: Option<usize>,
    interval_secs: Option<u64>,
    /// Overrides `interval_secs` (tests, demos).
    interval_ms: Option<u64>,
    max_batches: Option<u64>,
    shards_per_source: Option<u32>,
    shard_lease_secs: Option<u64>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_step_up_secs() -> u64 {
    300
}

fn default_totp_step_secs() -> u64 {
    30
}

fn default_max_failures() -> u32 {
    5
}

fn default_destroy_grace_secs() -> u64 {
    DEFAULT_DESTROY_GRACE.as_secs()
}

fn default_write_window_secs() -> u64 {
    keyfold::keyring::DEFAULT_WRITE_WINDOW.as_secs()
}

/// keyfold's default destroy grace period.
pub const DEFAULT_DESTROY_GRACE: Duration = keyfold::keyring::DEFAULT_DESTROY_GRACE;

fn default_staleness_secs() -> u64 {
    keyfold::keyring::DEFAULT_MAX_STALENESS.as_secs()
}

/// A config could not be loaded.
pub type ConfigResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

impl ServiceConfig {
    /// Reads a config file. Tokens come from the environment variables it names.
    ///
    /// # Errors
    /// Unreadable or invalid file, a missing token variable.
    pub fn from_file(path: &Path) -> ConfigResult<ServiceConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_json(&text, base, |var| std::env::var(var).ok())
            .map_err(|e| format!("{}: {e}", path.display()).into())
    }

    /// Parses a config file's text; relative paths are taken from `base`,
    /// tokens from `env`.
    ///
    /// # Errors
    /// Invalid JSON or config, a missing token variable.
    pub fn from_json(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> ConfigResult<ServiceConfig> {
        let file: FileConfig = serde_json::from_str(text)?;
        let mut tenants = Vec::new();
        for t in file.tenants {
            let token = env(&t.token_env).ok_or_else(|| {
                format!(
                    "tenant {}: environment variable {} (its admin token) is not set",
                    t.id, t.token_env
                )
            })?;
            tenants.push(TenantConfig {
                id: t.id,
                admin: t.admin,
                token,
            });
        }
        let config = ServiceConfig {
            listen: file.listen,
            metrics_listen: file.metrics_listen,
            database: match Database::parse(&file.database)? {
                Database::Sqlite(path) => Database::Sqlite(base.join(path)),
                postgres => postgres,
            },
            local_keks: file
                .local_keks
                .into_iter()
                .map(|(id, src)| match src {
                    KekSource::File(p) => (id, KekSource::File(base.join(p))),
                    env => (id, env),
                })
                .collect(),
            tenants,
            rewrap: RewrapConfig {
                batch_size: file.rewrap.batch_size.unwrap_or(100),
                interval: match file.rewrap.interval_ms {
                    Some(ms) => Duration::from_millis(ms),
                    None => Duration::from_secs(file.rewrap.interval_secs.unwrap_or(5)),
                },
                max_batches: file.rewrap.max_batches,
                retry_base: Duration::from_secs(5),
                shards_per_source: file.rewrap.shards_per_source.unwrap_or(16),
                shard_lease: Duration::from_secs(file.rewrap.shard_lease_secs.unwrap_or(30)),
            },
            step_up: StepUpConfig {
                token_ttl: Duration::from_secs(file.step_up_ttl_secs),
                totp_step: Duration::from_secs(file.totp_step_secs),
                max_failures: file.step_up_max_failures,
                ..StepUpConfig::default()
            },
            provider_endpoints: file.provider_endpoints,
            max_staleness: Duration::from_secs(file.max_staleness_secs),
            destroy_grace: Duration::from_secs(file.destroy_grace_secs),
            write_window: Duration::from_secs(file.write_window_secs),
            maintenance_interval: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// The development setup in `dir`: created on first start (a local KEK
    /// `dev-kek` in `kek.hex`, tenants `acme` and `globex` with random tokens
    /// in `dev-tokens.env`), reused afterwards.
    ///
    /// # Errors
    /// I/O errors.
    pub fn dev(dir: &Path, listen: SocketAddr) -> ConfigResult<ServiceConfig> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            // Tokens, TOTP secrets, the KEK and the database: owner-only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let kek = dir.join("kek.hex");
        if !kek.exists() {
            let hex = keyfold::LocalKek::generate_hex()?;
            write_private(&kek, hex.as_bytes())?;
        }
        let tokens_file = dir.join("dev-tokens.env");
        if !tokens_file.exists() {
            let mut text = String::new();
            for name in ["ACME", "GLOBEX"] {
                text.push_str(&format!("export {name}_TOKEN={}\n", random_hex(24)?));
            }
            write_private(&tokens_file, text.as_bytes())?;
        }
        let tokens = std::fs::read_to_string(&tokens_file)?;
        let token = |name: &str| -> ConfigResult<String> {
            tokens
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}_TOKEN=")))
                .map(str::to_owned)
                .ok_or_else(|| format!("{} has no {name}_TOKEN", tokens_file.display()).into())
        };
        let config = ServiceConfig {
            listen,
            metrics_listen: None,
            database: Database::Sqlite(dir.join("service.sqlite3")),
            local_keks: BTreeMap::from([("dev-kek".to_owned(), KekSource::File(kek))]),
            tenants: vec![
                TenantConfig {
                    id: "acme".into(),
                    admin: "admin@acme.example".into(),
                    token: token("ACME")?,
                },
                TenantConfig {
                    id: "globex".into(),
                    admin: "admin@globex.example".into(),
                    token: token("GLOBEX")?,
                },
            ],
            rewrap: RewrapConfig::default(),
            step_up: StepUpConfig::default(),
            provider_endpoints: BTreeMap::new(),
            max_staleness: keyfold::keyring::DEFAULT_MAX_STALENESS,
            destroy_grace: DEFAULT_DESTROY_GRACE,
            write_window: keyfold::keyring::DEFAULT_WRITE_WINDOW,
            maintenance_interval: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks tenants and tokens.
    ///
    /// # Errors
    /// Duplicate or invalid tenant ids, short or duplicate tokens, no tenants.
    pub fn validate(&self) -> ConfigResult<()> {
        if self.tenants.is_empty() {
            return Err("no tenants configured".into());
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if !valid_name(&t.id) {
                return Err(format!("tenant id {:?}: use 1..=128 of [A-Za-z0-9._-]", t.id).into());
            }
            if t.token.len() < 16 {
                return Err(
                    format!("tenant {}: admin token shorter than 16 characters", t.id).into(),
                );
            }
            if self
                .tenants
                .iter()
                .skip(i + 1)
                .any(|o| o.id == t.id || o.token == t.token)
            {
                return Err(format!("tenant {}: duplicate id or token", t.id).into());
            }
        }
        if self.rewrap.batch_size == 0 {
            return Err("rewrap batch_size must be at least 1".into());
        }
        if !(1..=65_536).contains(&self.rewrap.shards_per_source) {
            return Err("rewrap shards_per_source: 1..=65536".into());
        }
        if self.rewrap.shard_lease.is_zero() {
            return Err("rewrap shard_lease_secs must be at least 1".into());
        }
        if self.step_up.token_ttl > Duration::from_secs(3600) {
            return Err("step_up_ttl_secs: at most 3600 (a step-up token lives minutes)".into());
        }
        if !(1..=300).contains(&self.step_up.totp_step.as_secs()) {
            return Err("totp_step_secs: 1..=300 (RFC 6238 recommends 30)".into());
        }
        if self.step_up.max_failures == 0 || self.step_up.failure_window.is_zero() {
            return Err("step_up_max_failures and the failure window must be at least 1".into());
        }
        for (provider, url) in &self.provider_endpoints {
            let provider: &'static str = match provider.as_str() {
                "aws" => "aws",
                "gcp" => "gcp",
                "azure" => "azure",
                other => {
                    return Err(format!(
                        "provider_endpoints: unknown provider {other:?} (aws, gcp or azure)"
                    )
                    .into());
                }
            };
            keyfold::config::check_endpoint_url(provider, url)
                .map_err(|e| format!("provider_endpoints.{provider}: {e}"))?;
        }
        Ok(())
    }
}

/// A secret or tenant name: 1..=128 of `[A-Za-z0-9._-]`.
pub fn valid_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `n` random bytes, hex.
///
/// # Errors
/// The system RNG failed.
pub fn random_hex(n: usize) -> Result<String, keyfold::rng::RngError> {
    let mut bytes = vec![0u8; n];
    keyfold::rng::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn a_postgres_url_is_a_fleet_database_and_never_shows_its_password() {
        let db = Database::parse(
            "postgres://app:hunter2-secret@db.internal:5432/app?sslmode=verify-full&password=x2",
        )
        .unwrap();
        assert!(matches!(db, Database::Postgres(_)));
        for shown in [format!("{db:?}"), db.redacted()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("x2"), "{shown}");
            assert!(shown.contains("db.internal:5432/app"), "{shown}");
        }
        assert!(matches!(
            Database::parse("POSTGRESQL://db/app"),
            Ok(Database::Postgres(_))
        ));
        assert_eq!(
            Database::parse("data/service.sqlite3"),
            Ok(Database::Sqlite("data/service.sqlite3".into()))
        );
        let refused = Database::parse("postgress://app:hunter2-secret@db/app").unwrap_err();
        assert!(!refused.contains("hunter2"), "{refused}");
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../config.example.json");
        let env = |var: &str| Some(format!("{var}-value-0123456789"));
        let c = ServiceConfig::from_json(text, Path::new("/srv/kms"), env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            c.database,
            Database::Sqlite("/srv/kms/tenant-kms.sqlite3".into())
        );
        assert_eq!(
            c.local_keks.get("dev-kek"),
            Some(&KekSource::File("/srv/kms/kek.hex".into()))
        );
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].token, "ACME_TOKEN-value-0123456789");
        assert_eq!(c.rewrap.batch_size, 100);
        assert_eq!(c.rewrap.interval, Duration::from_secs(5));
        assert_eq!(c.step_up.token_ttl, Duration::from_secs(300));
        assert_eq!(c.step_up.totp_step, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("ACME_TOKEN-value"), "{c:?}");
        assert_eq!(c.max_staleness, Duration::from_secs(30));
    }

    #[test]
    fn bad_configs_are_refused_naming_the_problem() {
        let text = include_str!("../config.example.json");
        let err = ServiceConfig::from_json(text, Path::new("."), |_| None).unwrap_err();
        assert!(err.to_string().contains("ACME_TOKEN"), "{err}");
        let err =
            ServiceConfig::from_json(text, Path::new("."), |_| Some("short".into())).unwrap_err();
        assert!(err.to_string().contains("shorter than 16"), "{err}");
        let same = |_: &str| Some("the-same-token-0123456789".to_owned());
        let err = ServiceConfig::from_json(text, Path::new("."), same).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let unknown = text.replacen("\"listen\"", "\"listne\"", 1);
        let err = ServiceConfig::from_json(&unknown, Path::new("."), |v| {
            Some(format!("{v}-0123456789abcdef"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }
}
