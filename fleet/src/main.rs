//! `ferry-fleet`: the command line. Each command lives in its own module of
//! the library; this file only parses arguments and maps outcomes to exit
//! codes (0 done, 1 failed, 2 bad configuration or arguments).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_fleet::config::FleetConfig;

#[derive(Parser)]
#[command(name = "ferry-fleet", version, about = "The fleet's side of ferry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const DEFAULT_CONFIG: &str = "/etc/ferry-fleet/fleet.toml";

#[derive(Subcommand)]
enum Command {
    /// Checks fleet.toml and lists every problem.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Declares the tenant, namespace, topics and grants of fleet.toml in
    /// Pulsar; prints each change and applies only those.
    Provision {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the changes, apply none.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prints a JWT for a gateway of fleet.toml, signed with [signing].
    Token {
        gateway: String,
        /// How long it is valid: 3600s, 90m, 12h, 30d (at most 3650d), or
        /// `never` for a token without expiry.
        #[arg(long)]
        ttl: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Prints a ferry.toml for a gateway of fleet.toml.
    GatewayConfig {
        gateway: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Loads fleet.toml, or says why not (exit 2).
fn load(path: &Path) -> Result<FleetConfig, ExitCode> {
    ferry_fleet::config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) | Err(code) => code,
    }
}

fn run(command: Command) -> Result<ExitCode, ExitCode> {
    match command {
        Command::Check { config: path } => {
            let c = load(&path)?;
            println!(
                "{}: ok ({} gateways in {})",
                path.display(),
                c.gateways.len(),
                c.namespace()
            );
        }
        Command::Provision { config, dry_run } => {
            let c = load(&config)?;
            let runtime = tokio::runtime::Runtime::new().map_err(|e| {
                eprintln!("provision: cannot start: {e}");
                ExitCode::from(1)
            })?;
            let mut out = std::io::stdout();
            runtime
                .block_on(ferry_fleet::provision::provision(&c, dry_run, &mut out))
                .map_err(|e| {
                    eprintln!("provision failed: {e}");
                    ExitCode::from(1)
                })?;
        }
        Command::Token {
            gateway,
            ttl,
            config,
        } => {
            let ttl = ferry_fleet::token::parse_ttl(&ttl).map_err(|e| {
                eprintln!("{e}");
                ExitCode::from(2)
            })?;
            let c = load(&config)?;
            let token = ferry_fleet::token::issue(&c, &gateway, ttl, std::time::SystemTime::now())
                .map_err(|e| {
                    eprintln!("token: {e}");
                    match e {
                        ferry_fleet::token::TokenError::Sign => ExitCode::from(1),
                        _ => ExitCode::from(2),
                    }
                })?;
            println!("{token}");
        }
        Command::GatewayConfig { gateway, config } => {
            let c = load(&config)?;
            let text = ferry_fleet::gateway_config::render(&c, &gateway).map_err(|e| {
                eprintln!("gateway-config: {e}");
                ExitCode::from(2)
            })?;
            print!("{text}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
