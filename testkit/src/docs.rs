//! Checks that a settings table in `docs/` says what a binary's `--help`
//! says, so the docs can't drift from the code.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One option as `--help` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelpOption {
    pub env: Option<String>,
    pub default: Option<String>,
}

/// Every `--flag` of `binary args... --help`, with its variable and default.
pub fn help_options(binary: &Path, args: &[&str]) -> BTreeMap<String, HelpOption> {
    let output = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("run {} --help: {e}", binary.display()));
    let text = String::from_utf8_lossy(&output.stdout);
    let mut options = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if (2..=6).contains(&indent) && trimmed.starts_with('-') {
            current = trimmed
                .split([' ', ','])
                .find(|t| t.starts_with("--"))
                .map(str::to_owned);
            if let Some(flag) = &current {
                options.insert(flag.clone(), HelpOption::default());
            }
        }
        let Some(option) = current.as_ref().and_then(|f| options.get_mut(f)) else {
            continue;
        };
        if let Some(env) = bracketed(line, "[env: ") {
            option.env = Some(env.trim_end_matches('=').to_owned());
        }
        if let Some(default) = bracketed(line, "[default: ") {
            option.default = Some(default.to_owned());
        }
    }
    options.remove("--help");
    options.remove("--version");
    options
}

fn bracketed<'a>(line: &'a str, open: &str) -> Option<&'a str> {
    let start = line.find(open)? + open.len();
    let len = line[start..].find(']')?;
    Some(&line[start..start + len])
}

/// One row of a settings table: `| `VAR` | `--flag` | default | meaning |`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRow {
    /// `None` when the row's variable column says "none".
    pub env: Option<String>,
    /// Every `--flag` in the flag column.
    pub flags: Vec<String>,
    /// The first backticked value of the default column.
    pub default: Option<String>,
}

fn first_backticked(cell: &str) -> Option<String> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(cell[start..start + len].to_owned())
}

/// The rows of every settings table between the heading `## {section}` and
/// the next `## ` heading of `markdown`.
pub fn doc_rows(markdown: &str, section: &str) -> Vec<DocRow> {
    let heading = format!("## {section}");
    let mut inside = false;
    let mut rows = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == heading;
            continue;
        }
        if !inside || !line.starts_with("| ") || line.starts_with("| Variable") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 {
            continue;
        }
        rows.push(DocRow {
            env: first_backticked(cells[1]),
            flags: cells[2]
                .split('`')
                .filter(|t| t.starts_with("--"))
                .map(str::to_owned)
                .collect(),
            default: first_backticked(cells[3]),
        });
    }
    rows
}

/// Panics with every difference between the help's options and the rows:
/// a flag missing on either side, a variable or default that differs.
pub fn assert_documented(help: &BTreeMap<String, HelpOption>, rows: &[DocRow]) {
    let mut problems = Vec::new();
    for (flag, option) in help {
        match rows.iter().find(|r| r.flags.contains(flag)) {
            None => problems.push(format!("{flag} is not documented")),
            Some(row) => {
                if option.env.is_some() && row.env != option.env {
                    problems.push(format!(
                        "{flag}: --help says {:?}, docs say {:?}",
                        option.env, row.env
                    ));
                }
                if option.default.is_some() && row.default != option.default {
                    problems.push(format!(
                        "{flag}: default {:?} in --help, {:?} in docs",
                        option.default, row.default
                    ));
                }
            }
        }
    }
    for row in rows {
        for flag in &row.flags {
            if !help.contains_key(flag) {
                problems.push(format!("docs list {flag}, which --help doesn't"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n{}",
        problems.join("\n")
    );
}
