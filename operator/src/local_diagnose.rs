//! Why a local region doesn't come up: `dev` reads what its NATS servers
//! logged since this start, so a refused leafnode link (wrong seed, wrong
//! CA) is reported at once and by name instead of as a timeout.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How long each log was when `dev` started, so lines of earlier runs
/// (logs are appended to) are not taken for today's.
#[derive(Debug, Clone, Default)]
pub struct LogMarks(BTreeMap<PathBuf, u64>);

impl LogMarks {
    /// Marks the current end of each of `logs` (0 for a log not there yet).
    pub fn take(logs: impl IntoIterator<Item = PathBuf>) -> Self {
        LogMarks(
            logs.into_iter()
                .map(|log| {
                    let len = std::fs::metadata(&log).map_or(0, |m| m.len());
                    (log, len)
                })
                .collect(),
        )
    }

    /// What was appended to `log` since the mark (at most the last 1 MiB).
    fn since(&self, log: &Path) -> String {
        const MAX: u64 = 1 << 20;
        let Ok(mut file) = std::fs::File::open(log) else {
            return String::new();
        };
        let end = file.metadata().map_or(0, |m| m.len());
        let mark = self.0.get(log).copied().unwrap_or(0);
        let from = mark.max(end.saturating_sub(MAX));
        let mut text = String::new();
        if file.seek(SeekFrom::Start(from)).is_ok() {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }
}

/// What NATS logs when a leafnode link is refused, and what it means.
const REFUSALS: &[(&str, &str)] = &[
    (
        "Authorization Violation",
        "the hub refused the leaf's credentials (its nkey seed is not the one the hub's cluster holds)",
    ),
    (
        "certificate",
        "the TLS handshake with the hub failed (the leaf's cluster holds another CA than the hub's certificate)",
    ),
];

/// The first refused link in `logs` since the marks, as "what it means:
/// the line": `None` when nothing was refused.
pub fn refused_link(marks: &LogMarks, logs: &[PathBuf]) -> Option<String> {
    for log in logs {
        let text = marks.since(log);
        for line in text.lines() {
            let Some((_, meaning)) = REFUSALS
                .iter()
                .find(|(needle, _)| line.contains(needle) && line.contains("[ERR]"))
            else {
                continue;
            };
            return Some(format!(
                "{meaning}; {} logged: {}",
                log.display(),
                line.trim()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lines_written_since_the_mark_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nats-eu.log");
        let refused = "[1] 2026/11/28 13:28:45.4 [ERR] 127.0.0.1:1 - lid:5 - Leafnode Error 'Authorization Violation'\n";
        std::fs::write(&log, refused).unwrap();
        let marks = LogMarks::take([log.clone()]);
        let logs = vec![log.clone()];
        assert_eq!(refused_link(&marks, &logs), None, "an earlier run's line");
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("[1] 2026/11/28 13:30:00.0 [INF] Listening for client connections\n");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(refused_link(&marks, &logs), None);
        text.push_str(refused);
        std::fs::write(&log, &text).unwrap();
        let found = refused_link(&marks, &logs).expect("refusal found");
        assert!(
            found.starts_with("the hub refused the leaf's credentials")
                && found.contains("Authorization Violation"),
            "{found}"
        );
        let missing = vec![dir.path().join("absent.log")];
        assert_eq!(refused_link(&LogMarks::default(), &missing), None);
    }
}
