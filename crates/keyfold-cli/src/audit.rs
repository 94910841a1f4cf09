//! The CLI's audit sink: one JSON object per line, to a file or stderr.

use std::io::Write;
use std::sync::Mutex;

use keyfold_core::{AuditEvent, AuditSink};

use crate::error::{CliError, Kind};

enum Target {
    Stderr,
    File { path: String, file: std::fs::File },
}

/// Writes each event as a JSON line (`{"name": "kms.rotate", ...event}`)
/// and remembers the first write failure: the change is already committed
/// by then, so the command reports it with exit code 8 afterwards.
pub(crate) struct JsonLinesSink {
    target: Mutex<Target>,
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for JsonLinesSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLinesSink").finish_non_exhaustive()
    }
}

impl JsonLinesSink {
    /// `-` (or nothing) for stderr, else a file opened for appending
    /// (created owner-only). Opened now, so an unwritable log fails the
    /// command before it changes anything.
    pub(crate) fn open(spec: Option<&str>) -> Result<JsonLinesSink, CliError> {
        let target = match spec {
            None | Some("-") => Target::Stderr,
            Some(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let file = options.open(path).map_err(|e| {
                    CliError::new(Kind::Failure, format!("cannot open audit log {path}: {e}"))
                })?;
                Target::File {
                    path: path.to_owned(),
                    file,
                }
            }
        };
        Ok(JsonLinesSink {
            target: Mutex::new(target),
            failure: Mutex::new(None),
        })
    }

    /// The first write failure, if any, as the error the command ends with.
    pub(crate) fn check(&self) -> Result<(), CliError> {
        match self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            Some(m) => Err(CliError::new(
                Kind::Audit,
                format!("the change was made, but its audit event could not be written: {m}"),
            )),
            None => Ok(()),
        }
    }

    fn write(&self, event: &AuditEvent) -> Result<(), String> {
        let mut value = serde_json::to_value(event).map_err(|e| e.to_string())?;
        if let Some(object) = value.as_object_mut() {
            object.insert("name".into(), event.name().into());
        }
        let mut line = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut target = self
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *target {
            Target::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(&line).and_then(|()| err.flush())
            }
            Target::File { file, .. } => file.write_all(&line).and_then(|()| file.sync_data()),
        }
        .map_err(|e| match &*target {
            Target::File { path, .. } => format!("{path}: {e}"),
            Target::Stderr => format!("stderr: {e}"),
        })
    }
}

impl AuditSink for JsonLinesSink {
    fn record(&self, event: AuditEvent) {
        if let Err(m) = self.write(&event) {
            self.failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(m);
        }
    }
}
