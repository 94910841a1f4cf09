//! `keyfold kek generate`: a new local KEK in a new owner-only file.

use std::io::Write;
use std::path::Path;

use keyfold_core::LocalKek;
use serde_json::json;

use crate::error::{CliError, Kind};
use crate::ui::Output;

/// Writes a fresh KEK as hex (what [`LocalKek::from_file`] reads) to `out`,
/// created with mode 0600 and never over an existing file.
pub(crate) fn generate(out: &Path, output: Output) -> Result<(), CliError> {
    let hex = LocalKek::generate_hex()
        .map_err(|e| CliError::failure(format!("random generator: {e}")))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::new(
                Kind::Refused,
                format!(
                    "{} already exists: keyfold never overwrites a KEK (the keys it wraps would be lost)",
                    out.display()
                ),
            )
        } else {
            CliError::failure(format!("cannot create {}: {e}", out.display()))
        }
    })?;
    let written = file
        .write_all(hex.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // Leave no half-written key behind.
        let _ = std::fs::remove_file(out);
        return Err(CliError::failure(format!(
            "cannot write {}: {e}",
            out.display()
        )));
    }
    let path = out.display().to_string();
    output.emit(
        &format!(
            "wrote a new 32-byte KEK to {path} (mode 0600)\n\
             use it with: \"kms\": {{\"provider\": \"local\", \"kms_key_ref\": \"<a name for it>\", \"kek_file\": {path:?}}}\n\
             back it up: every keyring it wraps is unreadable without it\n"
        ),
        &json!({"kek_file": path, "mode": "0600", "bytes": 32, "encoding": "hex"}),
    );
    Ok(())
}
