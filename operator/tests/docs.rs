//! docs/configuration.md lists exactly the settings `presence-operator`'s
//! subcommands show in `--help`, with the same variables and defaults.

use std::collections::BTreeMap;
use std::path::Path;
use testkit::docs::{assert_documented, doc_rows, help_options};

#[test]
fn configuration_doc_matches_help() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .expect("docs/configuration.md");
    let binary = Path::new(env!("CARGO_BIN_EXE_presence-operator"));
    let mut help = BTreeMap::new();
    for subcommand in ["run", "render", "dev", "crd"] {
        for (flag, option) in help_options(binary, &[subcommand]) {
            // A flag shared by subcommands must mean the same everywhere,
            // except --namespace, whose two meanings the docs explain.
            if let Some(seen) = help.get(&flag)
                && seen != &option
                && flag != "--namespace"
            {
                panic!("{flag} differs between subcommands: {seen:?} vs {option:?}");
            }
            help.entry(flag).or_insert(option);
        }
    }
    assert!(help.contains_key("--log-level"), "{help:?}");
    assert_documented(&help, &doc_rows(&doc, "presence-operator"));
}
