//! CPU time spent by this process and by the PostgreSQL server's
//! processes, from `/proc` (Linux): where a run's CPU went, so a ratio can
//! be told apart from the noise of a shared machine.

use std::time::Duration;

/// CPU time (user + system) so far: this process, and every process named
/// `postgres` (the server's backends and background workers).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTimes {
    pub(crate) client: Duration,
    pub(crate) server: Duration,
}

impl CpuTimes {
    /// `None` where `/proc` is not readable (not Linux).
    pub(crate) fn now() -> Option<CpuTimes> {
        let client = ticks(&std::fs::read_to_string("/proc/self/stat").ok()?, false)?;
        let mut server = 0u64;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if stat.contains("(postgres)") {
                // With the reaped children's time: a backend that exits
                // between two readings (its pool closed) moves from its own
                // entry to the postmaster's, and is still counted.
                server += ticks(&stat, true).unwrap_or(0);
            }
        }
        Some(CpuTimes {
            client: from_ticks(client),
            server: from_ticks(server),
        })
    }

    pub(crate) fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            client: self.client.saturating_sub(earlier.client),
            server: self.server.saturating_sub(earlier.server),
        }
    }
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`, counted after the
/// command name, which may hold spaces), and with `children` the reaped
/// children's cutime + cstime (16 and 17).
fn ticks(stat: &str, children: bool) -> Option<u64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let own = fields.first()? + fields.get(1)?;
    Some(if children {
        own + fields.get(2)? + fields.get(3)?
    } else {
        own
    })
}

/// Clock ticks are 1/100 s on Linux (`sysconf(_SC_CLK_TCK)`, fixed by the
/// kernel ABI for `/proc`).
fn from_ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_after_a_name_with_spaces() {
        let stat = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 250 17 5 3 20";
        assert_eq!(ticks(stat, false), Some(267));
        assert_eq!(ticks(stat, true), Some(275));
    }
}
