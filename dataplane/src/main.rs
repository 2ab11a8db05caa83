//! `presence-service`: parse configuration, set up logging, serve.

use clap::Parser;
use presence_dataplane::config::{Cli, Command, LogFormat, Settings};
/// Many small short-lived allocations per request (headers, JSON, cache
/// entries): mimalloc spends far less time on them than glibc's malloc did
/// in profiles (~12% of a write) and keeps less overhead per cached user.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;

fn init_logging(settings: &Settings) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(settings.log_level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = &cli.command {
        // The service's own rule: a token signed with a secret it would
        // refuse is a token no node accepts.
        let secret = match cli.serve.signing_secret() {
            Ok(secret) => secret,
            Err(err) => {
                eprintln!("presence-service: configuration error: {err}");
                return ExitCode::from(2);
            }
        };
        return match presence_dataplane::auth::mint(secret, &args.sub, &args.scope, args.ttl_secs) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("presence-service: cannot sign token: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match cli.serve.validate() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("presence-service: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings);
    for name in presence_dataplane::config::unknown_variables(std::env::vars().map(|(k, _)| k)) {
        tracing::warn!(variable = %name, "ignoring an unknown setting; is it misspelt? (see presence-service --help)");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("presence-service: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(presence_dataplane::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "presence-service failed");
            eprintln!("presence-service: {err}");
            ExitCode::FAILURE
        }
    }
}
