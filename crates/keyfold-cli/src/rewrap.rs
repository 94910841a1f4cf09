//! `keyfold rewrap run|status`: a rewrap job (docs/LIFECYCLE.md, "Rewrap")
//! over the tables a job spec names, its checkpoint kept in the same
//! database (`keyfold_rewrap_jobs`) after every batch.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keyfold_rewrap::{
    BatchReport, Checkpoint, CompletionReport, JobError, JobOptions, Mode, RewrapJob, RowSource,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Deserialize;
use serde_json::json;

use crate::config::redact_url;
use crate::error::{CliError, Kind};
use crate::globals::Globals;
use crate::sqlite::{SqliteTable, TableSpec};
use crate::ui::rfc3339;

/// The table holding each job's checkpoint.
pub(crate) const JOB_TABLE: &str = "keyfold_rewrap_jobs";

/// A job spec file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobSpec {
    /// `sqlite://PATH` (relative to the spec file) or `postgres://…`.
    database: String,
    /// The keyring whose records the tables hold.
    pub(crate) keyring: String,
    /// Every table with records of that keyring: evidence for a destroy is
    /// only as complete as this list.
    pub(crate) tables: Vec<TableSpec>,
    #[serde(default)]
    pub(crate) batch_size: Option<usize>,
    #[serde(default)]
    pub(crate) mode: Option<Mode>,
}

/// Where a job spec's tables live.
enum Database {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl JobSpec {
    fn load(path: &Path) -> Result<(JobSpec, Database), CliError> {
        let bad = |m: String| CliError::usage(format!("job spec {}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let spec: JobSpec = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if spec.tables.is_empty() {
            return Err(bad(
                "no tables: list every table holding the keyring's records".into(),
            ));
        }
        #[cfg(feature = "postgres")]
        if spec.database.starts_with("postgres://") || spec.database.starts_with("postgresql://") {
            let url = spec.database.clone();
            return Ok((spec, Database::Postgres(url)));
        }
        let db = match spec.database.strip_prefix("sqlite://") {
            Some(p) if !p.is_empty() => {
                let p = Path::new(p);
                Database::Sqlite(match path.parent() {
                    Some(dir) if p.is_relative() => dir.join(p),
                    _ => p.to_path_buf(),
                })
            }
            _ => {
                return Err(bad(format!(
                    "database {:?}: use sqlite://PATH or postgres://… (the latter with the \
                     `postgres` feature)",
                    redact_url(&spec.database)
                )));
            }
        };
        Ok((spec, db))
    }
}

fn db_error(db: &Path, e: &rusqlite::Error) -> CliError {
    CliError::failure(format!("database {}: {e}", db.display()))
}

/// Opens an existing database (never creates one: a typo in the path must
/// not look like an empty table).
fn open_db(db: &Path, read_only: bool) -> Result<Connection, CliError> {
    if !db.is_file() {
        return Err(CliError::new(
            Kind::NotFound,
            format!("database {} does not exist", db.display()),
        ));
    }
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    let conn = Connection::open_with_flags(db, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| db_error(db, &e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| db_error(db, &e))?;
    Ok(conn)
}

/// The newest job of `keyring`: its checkpoint, if any.
fn latest_job(conn: &Connection, keyring: &str) -> Result<Option<Checkpoint>, CliError> {
    let exists: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [JOB_TABLE],
            |r| r.get(0),
        )
        .map_err(|e| CliError::failure(e.to_string()))?;
    if !exists {
        return Ok(None);
    }
    let text: Option<String> = conn
        .query_row(
            &format!(
                "SELECT checkpoint FROM {JOB_TABLE} WHERE keyring_id = ?1 AND NOT abandoned \
                 ORDER BY seq DESC LIMIT 1"
            ),
            [keyring],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| CliError::failure(e.to_string()))?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| CliError::failure(format!("stored checkpoint is unreadable: {e}")))
    })
    .transpose()
}

fn save_checkpoint(conn: &Mutex<Connection>, cp: &Checkpoint) -> Result<(), CliError> {
    let text = serde_json::to_string(cp).map_err(|e| CliError::failure(e.to_string()))?;
    let conn = conn
        .lock()
        .map_err(|_| CliError::failure("database connection poisoned"))?;
    conn.execute(
        &format!(
            "INSERT INTO {JOB_TABLE} (job_id, keyring_id, checkpoint, updated_at) \
             VALUES (?1, ?2, ?3, unixepoch()) \
             ON CONFLICT (job_id) DO UPDATE SET checkpoint = excluded.checkpoint, \
             updated_at = excluded.updated_at"
        ),
        params![cp.job_id, cp.keyring_id, text],
    )
    .map_err(|e| CliError::failure(format!("saving the checkpoint: {e}")))?;
    Ok(())
}

pub(crate) fn job_error(e: JobError) -> CliError {
    let kind = match &e {
        JobError::TargetUnusable { .. }
        | JobError::TargetRolledBack { .. }
        | JobError::LeaseExpired { .. } => Kind::Lifecycle,
        JobError::Keyring(core) => crate::error::core_kind(core),
        JobError::CheckpointMismatch(_) | JobError::NoSources => Kind::Usage,
        _ => Kind::Failure,
    };
    let hint = match kind {
        Kind::Lifecycle | Kind::Usage => "; start a new job with `keyfold rewrap run --restart`",
        _ => "",
    };
    CliError::new(kind, format!("{e}{hint}"))
}

pub(crate) fn counters_json(c: &keyfold_rewrap::Counters) -> serde_json::Value {
    json!({"seen": c.seen, "rewrapped": c.rewrapped, "skipped": c.skipped,
           "conflicts": c.conflicts, "failed": c.failed, "unresolved": c.unresolved})
}

/// How progress is shown: a bar on a terminal, plain lines otherwise,
/// JSON lines with `--json`.
enum Progress {
    /// The bar, when this run started and the rows seen before it.
    Bar(ProgressBar, Instant, u64),
    Lines,
    Json,
}

impl Progress {
    fn new(json: bool, done: u64) -> Progress {
        if json {
            return Progress::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        // Drawn from the first batch on, when the row count is known.
        let bar = ProgressBar::with_draw_target(Some(done), ProgressDrawTarget::hidden());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} rows · ETA {eta} · {msg}")
        {
            bar.set_style(style);
        }
        bar.set_position(done);
        Progress::Bar(bar, Instant::now(), done)
    }

    fn batch(&self, r: &BatchReport) {
        let t = &r.totals;
        match self {
            Progress::Bar(bar, started, before) => {
                bar.set_length(t.seen + r.estimated_remaining.unwrap_or(0));
                bar.set_position(t.seen);
                let secs = started.elapsed().as_secs_f64();
                let rate = if secs > 0.0 {
                    t.seen.saturating_sub(*before) as f64 / secs
                } else {
                    0.0
                };
                bar.set_message(format!(
                    "{rate:.0} rows/s · {} rewrapped, {} skipped, {} failed",
                    t.rewrapped, t.skipped, t.failed
                ));
                if bar.is_hidden() {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
            }
            Progress::Lines => println!(
                "batch {}: {} rows (+{} rewrapped) | total {} rewrapped, {} skipped, {} conflicts, {} failed | {} left",
                r.batch,
                r.counters.seen,
                r.counters.rewrapped,
                t.rewrapped,
                t.skipped,
                t.conflicts,
                t.failed,
                r.estimated_remaining
                    .map_or_else(|| "?".to_owned(), |n| n.to_string())
            ),
            Progress::Json => println!(
                "{}",
                json!({"batch": r.batch, "counters": counters_json(&r.counters),
                       "totals": counters_json(t), "estimated_remaining": r.estimated_remaining,
                       "failures": r.failures.iter().map(|f| json!({"table": f.source, "id": f.row_id, "error": f.error})).collect::<Vec<_>>(),
                       "completed": r.completed})
            ),
        }
        if !matches!(self, Progress::Json) {
            for f in &r.failures {
                let line = format!(
                    "row {} of {} left unchanged: {}",
                    f.row_id, f.source, f.error
                );
                match self {
                    Progress::Bar(bar, ..) => bar.println(line),
                    _ => eprintln!("{line}"),
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar, ..) = self {
            bar.finish_and_clear();
        }
    }
}

/// `keyfold rewrap run`.
pub(crate) async fn run(
    job_path: &Path,
    restart: bool,
    batch_size: Option<usize>,
    pause: Duration,
    g: &Globals,
) -> Result<(), CliError> {
    let (spec, db) = JobSpec::load(job_path)?;
    #[cfg_attr(
        not(feature = "postgres"),
        allow(
            clippy::infallible_destructuring_match,
            reason = "one variant without the postgres feature"
        )
    )]
    let db = match db {
        Database::Sqlite(db) => db,
        #[cfg(feature = "postgres")]
        Database::Postgres(url) => {
            return crate::rewrap_pg::run(&spec, &url, restart, batch_size, g).await;
        }
    };
    let actor = g.actor()?;
    let audit = g.audit()?;
    let conn = Arc::new(Mutex::new(open_db(&db, false)?));
    let sources = spec
        .tables
        .iter()
        .map(|t| SqliteTable::new(Arc::clone(&conn), t).map(|s| Arc::new(s) as Arc<dyn RowSource>))
        .collect::<Result<Vec<_>, _>>()?;
    let previous = {
        let c = conn
            .lock()
            .map_err(|_| CliError::failure("database connection poisoned"))?;
        c.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {JOB_TABLE} (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 job_id TEXT NOT NULL UNIQUE,
                 keyring_id TEXT NOT NULL,
                 checkpoint TEXT NOT NULL,
                 abandoned INTEGER NOT NULL DEFAULT 0,
                 updated_at INTEGER NOT NULL)"
        ))
        .map_err(|e| db_error(&db, &e))?;
        latest_job(&c, &spec.keyring)?
    };
    let wrapper = g.wrapper().await?;
    let keyring = Arc::new(
        g.keyring(&spec.keyring, wrapper, Arc::clone(&audit), false)
            .await?,
    );
    let options = JobOptions {
        batch_size: batch_size
            .or(spec.batch_size)
            .unwrap_or(JobOptions::default().batch_size),
        mode: spec.mode.unwrap_or_default(),
        ..JobOptions::default()
    };
    let builder = RewrapJob::builder(Arc::clone(&keyring), sources)
        .options(options)
        .audit(audit.clone(), actor);
    let mut job = match previous {
        Some(cp) if !cp.completed && !restart => builder.resume(cp).map_err(job_error)?,
        other => {
            if let Some(old) = other.filter(|cp| !cp.completed) {
                let c = conn
                    .lock()
                    .map_err(|_| CliError::failure("database connection poisoned"))?;
                c.execute(
                    &format!("UPDATE {JOB_TABLE} SET abandoned = 1 WHERE job_id = ?1"),
                    [&old.job_id],
                )
                .map_err(|e| db_error(&db, &e))?;
            }
            let job = builder.create().map_err(job_error)?;
            save_checkpoint(&conn, job.checkpoint())?;
            job
        }
    };
    let resumed = job.checkpoint().batches > 0;
    if !g.output.json {
        eprintln!(
            "{} job {} on keyring {}: target version {} ({} table(s))",
            if resumed { "resuming" } else { "starting" },
            job.checkpoint().job_id,
            spec.keyring,
            job.target_version(),
            spec.tables.len()
        );
    }

    // Ctrl-C: finish the current batch, save, stop.
    let interrupted = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    {
        let (interrupted, wake) = (Arc::clone(&interrupted), Arc::clone(&wake));
        let mut signal = interrupt_signal()?;
        tokio::spawn(async move {
            if signal.recv().await.is_some() {
                interrupted.store(true, Ordering::SeqCst);
                // A stored permit: a signal between the check at the top
                // of the loop and the pause still ends the pause.
                wake.notify_one();
            }
        });
    }

    let progress = Progress::new(g.output.json, job.checkpoint().totals().seen);
    let started = Instant::now();
    let before = job.checkpoint().totals().rewrapped;
    let mut stopped = false;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            stopped = true;
            break;
        }
        let report = match job.next_batch().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                progress.finish();
                return Err(job_error(e));
            }
        };
        save_checkpoint(&conn, job.checkpoint())?;
        progress.batch(&report);
        if report.completed {
            break;
        }
        if !pause.is_zero() {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    progress.finish();
    let cp = job.checkpoint();
    let totals = cp.totals();
    let elapsed = started.elapsed().as_secs_f64();
    let this_run = totals.rewrapped.saturating_sub(before);
    let summary = json!({
        "job_id": cp.job_id, "keyring": cp.keyring_id, "target_version": cp.target_version,
        "batches": cp.batches, "completed": cp.completed, "interrupted": stopped,
        "clean": job.completion().map(|c| c.is_clean()), "totals": counters_json(&totals),
        "rewrapped_this_run": this_run, "seconds": elapsed,
    });
    let text = if cp.completed {
        format!(
            "job {} complete: {} rewrapped, {} skipped, {} failed, {} unresolved ({} this run in {elapsed:.1} s)\n{}",
            cp.job_id,
            totals.rewrapped,
            totals.skipped,
            totals.failed,
            totals.unresolved,
            this_run,
            if job.completion().is_some_and(|c| c.is_clean()) {
                "every row is on the target version: `keyfold rewrap status --evidence-for V` gives destroy evidence for older versions\n"
            } else {
                "some rows were left unchanged: fix them and run a new job (--restart) before destroying anything\n"
            }
        )
    } else {
        format!(
            "job {} stopped after batch {} (checkpoint saved): {} rewrapped so far; run again to resume\n",
            cp.job_id, cp.batches, totals.rewrapped
        )
    };
    g.output.emit(&text, &summary);
    audit.check()?;
    if stopped {
        let mut e = CliError::new(
            Kind::Interrupted,
            "interrupted: the job stopped between batches",
        );
        e.details = Some(summary);
        return Err(e);
    }
    Ok(())
}

#[cfg(unix)]
pub(crate) fn interrupt_signal() -> Result<tokio::signal::unix::Signal, CliError> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::failure(format!("cannot handle Ctrl-C: {e}")))
}

#[cfg(not(unix))]
pub(crate) fn interrupt_signal() -> Result<tokio::signal::windows::CtrlC, CliError> {
    tokio::signal::windows::ctrl_c()
        .map_err(|e| CliError::failure(format!("cannot handle Ctrl-C: {e}")))
}

/// `keyfold rewrap status`.
pub(crate) async fn status(
    job_path: &Path,
    evidence_for: Option<u32>,
    g: &Globals,
) -> Result<(), CliError> {
    let (spec, db) = JobSpec::load(job_path)?;
    #[cfg_attr(
        not(feature = "postgres"),
        allow(
            clippy::infallible_destructuring_match,
            reason = "one variant without the postgres feature"
        )
    )]
    let db = match db {
        Database::Sqlite(db) => db,
        #[cfg(feature = "postgres")]
        Database::Postgres(url) => {
            return crate::rewrap_pg::status(&spec, &url, evidence_for, g).await;
        }
    };
    let conn = open_db(&db, true)?;
    let cp = latest_job(&conn, &spec.keyring)?.ok_or_else(|| {
        CliError::new(
            Kind::NotFound,
            format!(
                "no rewrap job for keyring {} in {}",
                spec.keyring,
                db.display()
            ),
        )
    })?;
    let totals = cp.totals();
    if let Some(version) = evidence_for {
        let report = CompletionReport {
            keyring_id: cp.keyring_id.clone(),
            job_id: cp.job_id.clone(),
            target_version: cp.target_version,
            shard: cp.shard,
            totals,
            started_at: cp.started_at,
        };
        let evidence =
            evidence_refusal(cp.completed.then_some(&report), version).map_err(|why| {
                CliError::new(
                    Kind::Lifecycle,
                    format!(
                        "job {} is no evidence that version {version} has no records: {why}",
                        cp.job_id
                    ),
                )
            })?;
        return emit_evidence(&evidence, g);
    }
    let per_table: Vec<serde_json::Value> = cp
        .sources
        .iter()
        .map(|s| json!({"table": s.name, "exhausted": s.exhausted, "counters": counters_json(&s.counters)}))
        .collect();
    let mut text = format!(
        "job {} on keyring {}: target version {}, mode {}\n\
         started {}, lease until {}\n\
         {} after {} batch(es): {} seen, {} rewrapped, {} skipped, {} conflicts, {} failed, {} unresolved\n",
        cp.job_id,
        cp.keyring_id,
        cp.target_version,
        match cp.mode {
            Mode::Reencrypt => "re-encrypt",
            _ => "rewrap",
        },
        rfc3339(cp.started_at),
        rfc3339(cp.lease_expires_at),
        if cp.completed {
            "complete"
        } else {
            "in progress"
        },
        cp.batches,
        totals.seen,
        totals.rewrapped,
        totals.skipped,
        totals.conflicts,
        totals.failed,
        totals.unresolved,
    );
    for s in &cp.sources {
        text.push_str(&format!(
            "  {:<24} {:>8} seen {:>8} rewrapped  {}\n",
            s.name,
            s.counters.seen,
            s.counters.rewrapped,
            if s.exhausted { "done" } else { "…" }
        ));
    }
    g.output.emit(
        &text,
        &json!({"job_id": cp.job_id, "keyring": cp.keyring_id, "target_version": cp.target_version,
                "mode": cp.mode, "started_at": cp.started_at, "lease_expires_at": cp.lease_expires_at,
                "batches": cp.batches, "completed": cp.completed, "totals": counters_json(&totals),
                "tables": per_table}),
    );
    Ok(())
}

/// Prints destroy evidence: JSON in both modes (it is meant for a file).
pub(crate) fn emit_evidence(
    evidence: &keyfold_core::keyring::NoRecordsLeft,
    g: &Globals,
) -> Result<(), CliError> {
    let json = serde_json::to_value(evidence).map_err(|e| CliError::failure(e.to_string()))?;
    g.output.emit(&format!("{json}\n"), &json);
    Ok(())
}

/// Why a finished job is no evidence for `version`, if it is not.
pub(crate) fn evidence_refusal(
    report: Option<&CompletionReport>,
    version: u32,
) -> Result<keyfold_core::keyring::NoRecordsLeft, String> {
    let Some(report) = report else {
        return Err("the job has not finished".to_owned());
    };
    if !report.is_clean() {
        return Err(format!(
            "the job left {} failed and {} unresolved rows",
            report.totals.failed, report.totals.unresolved
        ));
    }
    if version >= report.target_version {
        return Err(format!(
            "the job moved records onto version {}",
            report.target_version
        ));
    }
    report
        .evidence(version)
        .ok_or_else(|| "it does not cover every row".to_owned())
}
