//! `presence-operator`: print the CRD, render manifests, run a cluster locally.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use presence_operator::crd::PresenceCluster;
use presence_operator::render;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "presence-operator",
    version,
    about = "PresenceCluster operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the PresenceCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print every object the operator would apply for a PresenceCluster manifest.
    Render {
        /// The PresenceCluster manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Namespace for a manifest that names none.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

/// Reads one PresenceCluster from a YAML file.
fn read_cluster(path: &PathBuf) -> anyhow::Result<PresenceCluster> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid PresenceCluster", path.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", serde_yaml::to_string(&PresenceCluster::crd())?);
        }
        Command::Render { file, namespace } => {
            let cluster = read_cluster(&file)?;
            let ctx = render::Context::new(&cluster, &namespace)?;
            let inputs = render::Inputs {
                generated_jwt_secret: Some(render::secrets::random_secret()?),
            };
            let objects = render::render(&cluster, &ctx, &inputs)?;
            print!("{}", render::to_yaml(&objects)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("presence-operator: {err:#}");
            ExitCode::from(2)
        }
    }
}
