//! docs/configuration.md lists exactly the settings `presence-service
//! --help` shows, with the same variables and defaults.

use std::path::Path;
use testkit::docs::{assert_documented, doc_rows, help_options};

#[test]
fn configuration_doc_matches_help() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .expect("docs/configuration.md");
    let help = help_options(Path::new(env!("CARGO_BIN_EXE_presence-service")), &[]);
    assert!(help.len() >= 30, "{help:?}");
    let rows = doc_rows(&doc, "presence-service");
    assert_documented(&help, &rows);
    // Every variable the service reads is in the table, and nothing else.
    let mut documented: Vec<String> = rows.iter().filter_map(|r| r.env.clone()).collect();
    let mut accepted = presence_dataplane::config::accepted_variables();
    documented.sort();
    accepted.sort();
    assert_eq!(documented, accepted);
}
