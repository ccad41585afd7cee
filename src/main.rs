//! The `ferry` command: `run` the agent, `check` a configuration file.
//!
//! Exit codes: 0 success; 1 runtime failure (store unusable, fatal error);
//! 2 invalid configuration or command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "MQTT device state to Apache Pulsar, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The gateway's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and list every problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    match cli.command {
        Command::Check { config } => match ferry::config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok (gateway {}, {} subscription{}, topic {})",
                    config.display(),
                    c.gateway_id,
                    c.mqtt.subscriptions.len(),
                    if c.mqtt.subscriptions.len() == 1 {
                        ""
                    } else {
                        "s"
                    },
                    c.pulsar.topic
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let cfg = match ferry::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging();
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "ferry failed");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

fn run(cfg: ferry::config::Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let token = CancellationToken::new();
        ferry::shutdown::on_signals(token.clone())?;
        ferry::run(cfg, token).await?;
        Ok(())
    })
}

/// Logs to stderr; `RUST_LOG` overrides the default `info` level.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
