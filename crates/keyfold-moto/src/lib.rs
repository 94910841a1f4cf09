//! Test support shared by keyfold's AWS tests: moto's server (AWS KMS + STS)
//! started on a free 127.0.0.1 port by the test process, found through
//! `KEYFOLD_MOTO_SERVER` or `moto_server` on `PATH`, and stopped when the
//! handle drops or the test process exits. A missing moto is a loud failure
//! that says how to install it, never a skip.
#![forbid(unsafe_code)]
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure to start the emulator fails the test"
)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to do when moto is missing.
pub const SETUP_HINT: &str = "moto's server is needed for this test: run \
`eval \"$(scripts/setup-emulators)\"` from the workspace root (it installs moto[server] \
into a venv and exports KEYFOLD_MOTO_SERVER), or put `moto_server` on PATH";

/// A running moto server. Stopped on drop, and also when the test process
/// exits: it runs under a small shell that kills it as soon as its stdin (a
/// pipe from this process) closes.
pub struct MotoServer {
    port: u16,
    child: Mutex<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Closing stdin makes the shell kill moto and exit.
        drop(self.stdin.take());
        if let Ok(mut child) = self.child.lock() {
            let _ = child.wait();
        }
    }
}

/// The moto binary: `KEYFOLD_MOTO_SERVER`, else `moto_server` on `PATH`.
///
/// # Panics
/// When neither exists, with [`SETUP_HINT`].
pub fn moto_binary() -> PathBuf {
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

/// Why one attempt to start moto failed (the message has moto's log).
enum NotUp {
    /// Moto exited: worth another port.
    Exited(String),
    /// Moto runs but never answered.
    TimedOut(String),
}
use NotUp::{Exited, TimedOut};

impl MotoServer {
    /// Starts a new moto server, logging to a file in `log_dir`, and waits
    /// (up to 60 s) until it answers `GET /moto-api/`. The port is picked
    /// free, then given to moto: should something else take it meanwhile,
    /// moto exits at once and another port is tried (three in all).
    ///
    /// # Panics
    /// When moto is missing or does not come up (with its log).
    pub fn start(log_dir: &Path) -> MotoServer {
        let mut attempt = 1;
        loop {
            match Self::try_start(log_dir) {
                Ok(moto) => return moto,
                Err(Exited(_)) if attempt < 3 => attempt += 1,
                Err(Exited(failure) | TimedOut(failure)) => panic!("{failure}"),
            }
        }
    }

    /// One attempt on one port.
    fn try_start(log_dir: &Path) -> Result<MotoServer, NotUp> {
        let bin = moto_binary();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = log_dir.join(format!("moto-{}-{port}.log", std::process::id()));
        let log_file = File::create(&log).unwrap();
        // The shell ends when moto does (say, the port was taken) and stops
        // moto when its stdin closes (this handle dropped, or this process
        // gone). A background list's stdin is /dev/null unless redirected,
        // hence fd 3.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(
                r#"exec 3<&0; "$0" -H 127.0.0.1 -p "$1" & pid=$!
                   (read -r _ <&3; kill $pid 2>/dev/null) & reader=$!
                   wait $pid; status=$?; kill $reader 2>/dev/null; exit $status"#,
            )
            .arg(&bin)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}. {SETUP_HINT}", bin.display()));
        let stdin = child.stdin.take();
        let moto = MotoServer {
            port,
            child: Mutex::new(child),
            stdin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http(port, "GET", "/moto-api/").is_some_and(|r| r.contains(" 200 ")) {
                return Ok(moto);
            }
            let exited = moto.child.lock().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&moto.log).unwrap_or_default();
                let failure = format!(
                    "moto_server ({}) did not come up on port {port}: {exited:?}\n{log}",
                    bin.display()
                );
                return Err(if exited.is_some() {
                    Exited(failure)
                } else {
                    TimedOut(failure)
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Clears all of moto's state.
    ///
    /// # Panics
    /// When moto does not answer 200.
    pub fn reset(&self) {
        let r = http(self.port, "POST", "/moto-api/reset").unwrap_or_default();
        assert!(r.contains(" 200 "), "moto reset failed: {r}");
    }
}
