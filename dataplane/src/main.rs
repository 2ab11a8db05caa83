//! `presence-service`: parse configuration, set up logging, serve.

use clap::Parser as _;
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => match presence_dataplane::config::value_error_line(&err) {
            Some(line) => {
                eprintln!("presence-service: configuration error: {line}");
                return ExitCode::from(2);
            }
            // Help, version, an unknown flag: clap's own words and code.
            None => err.exit(),
        },
    };
    if let Some(Command::Token(args)) = &cli.command {
        // The node's own rules: a token it would refuse helps nobody.
        let (secret, grant) = match args.grant(&cli.serve) {
            Ok(signing) => signing,
            Err(err) => {
                eprintln!("presence-service: cannot make a token: {err}");
                return ExitCode::from(2);
            }
        };
        return match presence_dataplane::auth::mint_for(secret, &grant) {
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
    let secret_bytes = settings.jwt_secret.len();
    if secret_bytes < presence_contract::rules::RECOMMENDED_JWT_SECRET_BYTES {
        tracing::warn!(
            bytes = secret_bytes,
            "JWT_SECRET is shorter than the 32 bytes RFC 7518 asks of an HS256 key; a longer one (openssl rand -base64 32) is harder to guess offline from a token"
        );
    }
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
