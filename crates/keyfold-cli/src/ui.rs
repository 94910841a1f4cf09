//! Output (text or JSON), confirmation prompts and time formatting.

use std::io::{BufRead, IsTerminal, Write};

use keyfold_core::time::Timestamp;

use crate::error::{CliError, Kind};

/// How results are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    /// Prints a result: `text` for people, `json` with `--json`.
    pub(crate) fn emit(&self, text: &str, json: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (a pipe to `head`) is not worth a panic or an error.
        let _ = if self.json {
            writeln!(out, "{json}")
        } else {
            write!(out, "{text}")
        };
        let _ = out.flush();
    }

    /// Prints a failure: a JSON object on stdout with `--json`, a line on
    /// stderr otherwise.
    pub(crate) fn error(&self, e: &CliError) {
        if self.json {
            let mut json = serde_json::json!({
                "error": {"kind": e.kind.name(), "exit_code": e.kind.code(), "message": e.message,
                          "code": e.code}
            });
            if let (Some(serde_json::Value::Object(details)), Some(object)) =
                (&e.details, json.as_object_mut())
            {
                for (k, v) in details {
                    object.insert(k.clone(), v.clone());
                }
            }
            let _ = writeln!(std::io::stdout().lock(), "{json}");
        } else {
            let _ = writeln!(std::io::stderr().lock(), "keyfold: {}", e.message);
        }
    }
}

/// Asks the operator to type `expected` before a destructive change, unless
/// `yes`. Refuses when stdin is not a terminal (a script must say `--yes`).
pub(crate) fn confirm(yes: bool, what: &str, expected: &str) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::new(
            Kind::Refused,
            format!("{what}: refusing without --yes (stdin is not a terminal to confirm on)"),
        ));
    }
    confirm_from(&mut stdin.lock(), &mut std::io::stderr(), what, expected)
}

/// The prompt itself, over any reader (tested without a terminal).
pub(crate) fn confirm_from(
    input: &mut dyn BufRead,
    prompt: &mut dyn Write,
    what: &str,
    expected: &str,
) -> Result<(), CliError> {
    let _ = write!(prompt, "{what}.\nType {expected:?} to confirm: ");
    let _ = prompt.flush();
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| CliError::failure(format!("reading the confirmation: {e}")))?;
    if line.trim() == expected {
        Ok(())
    } else {
        Err(CliError::new(
            Kind::Refused,
            format!("{what}: not confirmed"),
        ))
    }
}

/// RFC 3339 (UTC) for a timestamp.
pub(crate) fn rfc3339(t: Timestamp) -> String {
    t.to_string()
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub(crate) fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    if b.len() != 20
        || b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't'))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
        || !matches!(b.get(19), Some(b'Z' | b'z'))
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u64> { text.get(from..to)?.parse().ok() };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hh, mm, ss) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d == 0 || d > *month_days.get(usize::try_from(m - 1).ok()?)? {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(Timestamp(days * 86_400 + hh * 3600 + mm * 60 + ss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for secs in [0, 951_782_400, 1_796_000_461, 4_102_444_799] {
            let t = Timestamp(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{secs}");
        }
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(Timestamp(951_782_400))
        );
        for bad in [
            "2001-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00+01:00",
            "tomorrow",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn confirmation_needs_the_exact_word() {
        let mut sink = Vec::new();
        assert!(confirm_from(&mut &b"acme\n"[..], &mut sink, "Destroy", "acme").is_ok());
        let refused = confirm_from(&mut &b"y\n"[..], &mut sink, "Destroy", "acme");
        assert_eq!(refused.err().map(|e| e.kind), Some(Kind::Refused));
        let eof = confirm_from(&mut &b""[..], &mut sink, "Destroy", "acme");
        assert_eq!(eof.err().map(|e| e.kind), Some(Kind::Refused));
        assert!(String::from_utf8_lossy(&sink).contains("Type \"acme\" to confirm"));
    }
}
