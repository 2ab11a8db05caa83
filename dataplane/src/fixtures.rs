//! Test helpers shared by the modules' unit tests.

use crate::config::{Cli, Settings};
use clap::Parser;

/// The settings of a node on the memory store whose tokens are signed with
/// `secret`, with `extra` flags on top.
pub fn memory_settings(secret: &str, extra: &[&str]) -> Settings {
    let jwt_secret = format!("--jwt-secret={secret}");
    let mut args = vec!["presence-service", "--store=memory", jwt_secret.as_str()];
    args.extend_from_slice(extra);
    Cli::try_parse_from(args)
        .expect("args")
        .serve
        .validate()
        .expect("settings")
}
