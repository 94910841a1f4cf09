//! Crash safety: the rewrap job is killed with SIGKILL at random points,
//! many times over; each restart resumes from the checkpoint persisted in
//! SQLite; at the end every row decrypts to its original plaintext and sits
//! on the target version.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_rewrap-sqlite");

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("spawn rewrap-sqlite");
    assert!(
        out.status.success(),
        "rewrap-sqlite {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// xorshift64*: enough randomness for kill points, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[test]
fn killed_at_random_points_the_job_resumes_and_loses_nothing() {
    let seed = std::env::var("KEYFOLD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("seed {seed} (set KEYFOLD_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("keyfold-crash-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    run(&["init", d, "--rows", "20000"]);

    let mut interrupted = 0;
    let mut finished_alone = false;
    for run_no in 0..30 {
        let mut child = Command::new(BIN)
            .args(["run", d])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its first saved batch, as it prints it: the kill point is taken
        // from there (one run in five from its start), so a slow machine
        // still sees runs killed mid-job, not only during start-up.
        let (saved, first_batch) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("batch") {
                    let _ = saved.send(());
                }
            }
        });
        if run_no % 5 != 0 {
            let _ = first_batch.recv_timeout(Duration::from_secs(60));
        }
        let deadline = Instant::now() + Duration::from_millis(10 + rng.below(250));
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "run failed on its own: {status}");
                finished_alone = true;
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                interrupted += 1;
            }
        }
    }
    assert!(
        interrupted >= 3,
        "only {interrupted} runs were killed mid-job"
    );
    let status = String::from_utf8(run(&["status", d]).stdout).unwrap();
    println!("{interrupted} runs killed; persisted checkpoint: {status}");
    let batches: u64 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(batches >= 2, "the killed runs made no progress: {status}");
    if !finished_alone {
        run(&["run", d]);
    }
    let out = run(&["verify", d]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("all 40000 rows"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
