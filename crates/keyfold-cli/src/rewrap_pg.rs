//! `keyfold rewrap run|status` on PostgreSQL: keyfold-postgres's
//! distributed job (jobs, shards and checkpoints in its tables). `run`
//! creates the job or joins the newest unfinished one as one more worker, so
//! several `keyfold rewrap run` (or service workers) share it; `status`
//! reads the job tables.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use keyfold_core::AuditSink;
use keyfold_core::audit::{AuditEvent, AuditKind};
use keyfold_core::time::Timestamp;
use keyfold_postgres::{
    DistributedJobError, DistributedJobOptions, JobStatus, OnNull, PgTable, RewrapCoordinator,
};
use serde_json::json;

use crate::config::pg;
use crate::error::{CliError, Kind};
use crate::globals::Globals;
use crate::rewrap::{JobSpec, counters_json, emit_evidence, evidence_refusal, interrupt_signal};
use crate::sqlite::ContextSource;

fn job_error(e: DistributedJobError) -> CliError {
    match e {
        DistributedJobError::Job(e) => crate::rewrap::job_error(e),
        DistributedJobError::UnknownJob(_) => CliError::new(Kind::NotFound, e.to_string()),
        DistributedJobError::JobFailed { .. } | DistributedJobError::WrongKeyring { .. } => {
            CliError::new(
                Kind::Lifecycle,
                format!("{e}; start a new job with `keyfold rewrap run --restart`"),
            )
        }
        DistributedJobError::NoSources
        | DistributedJobError::DuplicateSource(_)
        | DistributedJobError::InvalidOption(_) => CliError::usage(e.to_string()),
        other => CliError::failure(other.to_string()),
    }
}

async fn coordinator(
    url: &str,
    g: &Globals,
) -> Result<(sqlx::PgPool, RewrapCoordinator), CliError> {
    let pool = pg::connect(url).await?;
    let prefix = pg::prefix(g.config.table_prefix.as_deref())?;
    Ok((pool.clone(), RewrapCoordinator::new(pool, prefix)))
}

/// The newest job of `keyring` in the job table, if any.
async fn latest_job(
    pool: &sqlx::PgPool,
    g: &Globals,
    keyring: &str,
) -> Result<Option<String>, CliError> {
    let prefix = pg::prefix(g.config.table_prefix.as_deref())?;
    sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE keyring_id = $1 ORDER BY started_at DESC, id DESC LIMIT 1",
        prefix.table("rewrap_jobs")
    ))
    .bind(keyring)
    .fetch_optional(pool)
    .await
    .map_err(|e| CliError::failure(format!("reading the job table: {e}")))
}

async fn tables(spec: &JobSpec, pool: &sqlx::PgPool) -> Result<Vec<PgTable>, CliError> {
    let mut out = Vec::new();
    for t in &spec.tables {
        let mut b = PgTable::builder(&t.name)
            .id_column(&t.id_column)
            .ciphertext_column(&t.ciphertext_column)
            .source_name(&t.name);
        for (key, source) in &t.context {
            b = match source {
                ContextSource::Column(c) => b.context_column_with(c, key, OnNull::Omit),
                ContextSource::Value(v) => b.context_constant(key, v),
            };
        }
        out.push(
            b.build(pool)
                .await
                .map_err(|e| CliError::usage(format!("job spec: table {:?}: {e}", t.name)))?,
        );
    }
    Ok(out)
}

fn status_json(s: &JobStatus) -> serde_json::Value {
    json!({"job_id": s.job_id, "keyring": s.keyring_id, "target_version": s.target_version,
           "shards": s.shards, "shards_done": s.shards_done, "shards_leased": s.shards_leased,
           "rows_total": s.rows_total, "rows_read": s.rows_read,
           "rows_per_second": s.rows_per_second, "totals": counters_json(&s.totals),
           "completed": s.completed, "failed": s.failed})
}

fn status_line(s: &JobStatus) -> String {
    let t = &s.totals;
    format!(
        "{} of ~{} rows seen ({} rewrapped, {} skipped, {} failed) · shards {}/{} · {:.0} rows/s",
        t.seen,
        s.rows_total,
        t.rewrapped,
        t.skipped,
        t.failed,
        s.shards_done,
        s.shards,
        s.rows_per_second
    )
}

/// `keyfold rewrap run` on PostgreSQL.
pub(crate) async fn run(
    spec: &JobSpec,
    url: &str,
    restart: bool,
    batch_size: Option<usize>,
    g: &Globals,
) -> Result<(), CliError> {
    let actor = g.actor()?;
    let audit = g.audit()?;
    let (pool, coordinator) = coordinator(url, g).await?;
    coordinator
        .migrate()
        .await
        .map_err(|e| CliError::failure(format!("creating the job tables: {e}")))?;
    let sources = tables(spec, &pool).await?;
    let wrapper = g.wrapper().await?;
    let keyring = Arc::new(
        g.keyring(&spec.keyring, wrapper, Arc::clone(&audit), false)
            .await?,
    );
    let resume = match latest_job(&pool, g, &spec.keyring).await? {
        Some(id) if !restart => {
            let s = coordinator.status(&id).await.map_err(job_error)?;
            (!s.completed && s.failed.is_none()).then_some(id)
        }
        _ => None,
    };
    let job_id = match resume {
        Some(id) => id,
        None => {
            let mut options = DistributedJobOptions::default();
            if let Some(b) = batch_size.or(spec.batch_size) {
                options.batch_size = b;
            }
            options.mode = spec.mode.unwrap_or_default();
            let id = coordinator
                .create_job(&keyring, &sources, &options)
                .await
                .map_err(job_error)?;
            let target = keyring.active_version().unwrap_or_default();
            audit.record(AuditEvent {
                keyring_id: spec.keyring.clone(),
                actor: actor.clone(),
                at: Timestamp::now(),
                kind: AuditKind::RewrapStarted {
                    job_id: id.clone(),
                    target_version: target,
                },
            });
            id
        }
    };
    if !g.output.json {
        eprintln!(
            "working on job {job_id} of keyring {} ({} table(s)) as worker pid-{}",
            spec.keyring,
            spec.tables.len(),
            std::process::id()
        );
    }

    // Ctrl-C: the worker releases its shard between two batches (checkpoint
    // saved) and returns.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let mut signal = interrupt_signal()?;
    tokio::spawn(async move {
        if signal.recv().await.is_some() {
            let _ = stop.send(true);
        }
    });
    let cancel = {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let worker = coordinator.worker(&job_id, Arc::clone(&keyring), sources);
    let mut work = tokio::spawn(async move { worker.run_until(cancel).await });

    let bar = (!g.output.json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} rows · ETA {eta} · {msg}")
        {
            bar.set_style(style);
        }
        bar
    });
    let mut last = None;
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Ok(s) = coordinator.status(&job_id).await else {
            continue;
        };
        let seen = (s.totals.seen, s.shards_done);
        if last == Some(seen) {
            continue;
        }
        last = Some(seen);
        match &bar {
            Some(bar) => {
                bar.set_length(s.rows_total.max(s.totals.seen));
                bar.set_position(s.totals.seen);
                bar.set_message(format!(
                    "{:.0} rows/s · shards {}/{} · {} rewrapped, {} failed",
                    s.rows_per_second, s.shards_done, s.shards, s.totals.rewrapped, s.totals.failed
                ));
            }
            None if g.output.json => println!("{}", status_json(&s)),
            None => println!("{}", status_line(&s)),
        }
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let interrupted = *stopped.borrow_and_update();
    let report = result
        .map_err(|e| CliError::failure(format!("the worker stopped: {e}")))?
        .map_err(job_error)?;
    let status = coordinator.status(&job_id).await.map_err(job_error)?;
    if status.completed
        && !interrupted
        && let Some(done) = coordinator.completion(&job_id).await.map_err(job_error)?
    {
        audit.record(AuditEvent {
            keyring_id: spec.keyring.clone(),
            actor,
            at: Timestamp::now(),
            kind: AuditKind::RewrapCompleted {
                job_id: job_id.clone(),
                target_version: done.target_version,
                rewrapped: done.totals.rewrapped,
                skipped: done.totals.skipped,
                failed: done.totals.failed,
            },
        });
    }
    let mut summary = status_json(&status);
    if let Some(o) = summary.as_object_mut() {
        o.insert("interrupted".into(), interrupted.into());
        o.insert(
            "this_worker".into(),
            json!({"shards_finished": report.shards_finished, "batches": report.batches,
                   "counters": counters_json(&report.counters)}),
        );
    }
    let text = format!(
        "job {job_id}: {}\n{}\n",
        status_line(&status),
        if status.completed {
            "complete: `keyfold rewrap status --evidence-for V` gives destroy evidence for older versions when no row failed"
        } else if interrupted {
            "stopped (checkpoint saved); run again to resume"
        } else {
            "this worker is done; other workers hold the last shards"
        }
    );
    g.output.emit(&text, &summary);
    audit.check()?;
    if interrupted && !status.completed {
        let mut e = CliError::new(
            Kind::Interrupted,
            "interrupted: the worker released its shard",
        );
        e.details = Some(summary);
        return Err(e);
    }
    Ok(())
}

/// `keyfold rewrap status` on PostgreSQL.
pub(crate) async fn status(
    spec: &JobSpec,
    url: &str,
    evidence_for: Option<u32>,
    g: &Globals,
) -> Result<(), CliError> {
    let (pool, coordinator) = coordinator(url, g).await?;
    let job_id = latest_job(&pool, g, &spec.keyring)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            CliError::new(
                Kind::NotFound,
                format!("no rewrap job for keyring {}", spec.keyring),
            )
        })?;
    if let Some(version) = evidence_for {
        let done = coordinator.completion(&job_id).await.map_err(job_error)?;
        let evidence = evidence_refusal(done.as_ref(), version).map_err(|why| {
            CliError::new(
                Kind::Lifecycle,
                format!("job {job_id} is no evidence that version {version} has no records: {why}"),
            )
        })?;
        return emit_evidence(&evidence, g);
    }
    let s = coordinator.status(&job_id).await.map_err(job_error)?;
    g.output.emit(
        &format!(
            "job {job_id} on keyring {}: target version {}, {}\n{}\n",
            s.keyring_id,
            s.target_version,
            if s.completed {
                "complete"
            } else if s.failed.is_some() {
                "failed"
            } else {
                "in progress"
            },
            status_line(&s)
        ),
        &status_json(&s),
    );
    Ok(())
}
