//! Test support: moto's server (AWS KMS + STS) started on a free loopback
//! port by the test process itself, and helpers to make keys in it.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support shared by several test binaries"
)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{Credentials, Region};
use keyfold_aws::{AwsKmsWrapper, AwsKmsWrapperBuilder};
use keyfold_core::config::AwsConfig;

/// moto's default account.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "eu-west-1";
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/keyfold-test";
pub const EXTERNAL_ID: &str = "keyfold-test-external-id";
/// Base credentials for `AssumeRole` against the emulator (never reach KMS).
pub const BASE_ACCESS_KEY: &str = "AKIAKEYFOLDBASE00000";
pub const BASE_SECRET_KEY: &str = "keyfold-base-secret-for-the-emulator";

/// A running moto server. The process is stopped when this is dropped, and
/// also when the test process exits: it runs under a small shell that kills
/// it as soon as its stdin (a pipe from this process) closes.
pub struct Moto {
    pub port: u16,
    child: Mutex<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        // Closing stdin makes the shell kill moto and exit.
        drop(self.stdin.take());
        if let Ok(mut child) = self.child.lock() {
            let _ = child.wait();
        }
    }
}

const SETUP_HINT: &str = "moto's server is needed for the keyfold-aws tests: run \
`eval \"$(scripts/setup-emulators)\"` from the workspace root (it installs moto[server] \
into a venv and exports KEYFOLD_MOTO_SERVER), or put `moto_server` on PATH";

fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYFOLD_MOTO_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KEYFOLD_MOTO_SERVER={} does not exist. {SETUP_HINT}",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("KEYFOLD_MOTO_SERVER is not set and no moto_server on PATH. {SETUP_HINT}")
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Moto {
    /// Starts a new moto server and waits until it answers `GET /moto-api/`.
    pub fn start() -> Moto {
        let bin = moto_binary();
        let port = free_port();
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("keyfold-moto-{}-{port}.log", std::process::id()));
        let log_file = File::create(&log).unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" -H 127.0.0.1 -p "$1" & pid=$!; trap 'kill $pid 2>/dev/null' EXIT; read -r _; exit 0"#)
            .arg(&bin)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}. {SETUP_HINT}", bin.display()));
        let stdin = child.stdin.take().unwrap();
        let moto = Moto {
            port,
            child: Mutex::new(child),
            stdin: Some(stdin),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http(port, "GET", "/moto-api/").is_some_and(|r| r.contains(" 200 ")) {
                return moto;
            }
            let exited = moto.child.lock().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&moto.log).unwrap_or_default();
                panic!(
                    "moto_server ({}) did not come up on port {port}: {exited:?}\n{log}",
                    bin.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One server shared by all tests of this test binary; each test makes
    /// its own keys, so they do not interfere.
    pub fn shared() -> &'static Moto {
        static MOTO: OnceLock<Moto> = OnceLock::new();
        MOTO.get_or_init(Moto::start)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Clears all of moto's state.
    pub fn reset(&self) {
        let r = http(self.port, "POST", "/moto-api/reset").unwrap();
        assert!(r.contains(" 200 "), "{r}");
    }

    /// A KMS client with static test credentials, for administering the
    /// emulator (creating keys, aliases, rotating).
    pub fn admin(&self) -> aws_sdk_kms::Client {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.url())
            .credentials_provider(Credentials::new(
                "AKIAKEYFOLDADMIN0000",
                "admin-secret",
                None,
                None,
                "keyfold-test",
            ))
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// A new symmetric key; returns its ARN.
    pub async fn create_key(&self) -> String {
        let out = self
            .admin()
            .create_key()
            .description("keyfold test key")
            .send()
            .await
            .unwrap();
        out.key_metadata().unwrap().arn().unwrap().to_owned()
    }

    /// Points `alias/NAME` at `key_arn`.
    pub async fn create_alias(&self, name: &str, key_arn: &str) {
        self.admin()
            .create_alias()
            .alias_name(format!("alias/{name}"))
            .target_key_id(key_arn)
            .send()
            .await
            .unwrap();
    }

    /// The config of a wrapper over `key_ref` in this emulator.
    pub fn config(&self, key_ref: &str) -> AwsConfig {
        AwsConfig {
            kms_key_ref: key_ref.to_owned(),
            region: REGION.to_owned(),
            role_arn: ROLE_ARN.to_owned(),
            external_id: Some(EXTERNAL_ID.to_owned()),
            endpoint_url: Some(self.url()),
        }
    }

    /// A builder over `key_ref` whose role is assumed through this
    /// emulator's STS with the base test credentials.
    pub fn builder(&self, key_ref: &str) -> AwsKmsWrapperBuilder {
        AwsKmsWrapper::builder(self.config(key_ref))
            .sts_endpoint_url(self.url())
            .base_credentials(Credentials::new(
                BASE_ACCESS_KEY,
                BASE_SECRET_KEY,
                None,
                None,
                "keyfold-test-base",
            ))
    }

    pub async fn wrapper(&self, key_ref: &str) -> AwsKmsWrapper {
        self.builder(key_ref).build().await.unwrap()
    }
}

/// A unique name for aliases and keyrings in a shared emulator.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
