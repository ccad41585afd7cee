//! The `ferry` command: `run` the agent, `check` a configuration file.
//!
//! Exit codes: 0 success; 1 runtime failure (store unusable, fatal error);
//! 2 invalid configuration or command line; 3 `check --online` found a
//! broker unreachable or refusing.

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
        /// Also connect to both brokers and report (for installers).
        #[arg(long)]
        online: bool,
    },
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_ONLINE: u8 = 3;

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    match cli.command {
        Command::Check { config, online } => check(&config, online),
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

fn check(path: &std::path::Path, online: bool) -> ExitCode {
    let cfg = match ferry::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let subs = cfg.mqtt.subscriptions.len();
    println!(
        "{}: ok (gateway {}, {subs} subscription{}, topic {})",
        path.display(),
        cfg.gateway_id,
        if subs == 1 { "" } else { "s" },
        cfg.pulsar.topic
    );
    for w in ferry::check::secret_file_warnings(&cfg) {
        eprintln!("warning: {w}");
    }
    if !online {
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let probes = rt.block_on(ferry::check::online(&cfg));
    let mut ok = true;
    for p in probes {
        match p.result {
            Ok(line) => println!("{}: ok, {line}", p.what),
            Err(line) => {
                ok = false;
                println!("{}: FAILED, {line}", p.what);
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ONLINE)
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
