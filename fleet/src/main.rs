//! `ferry-fleet`: the command line. Each command lives in its own module of
//! the library; this file only parses arguments and maps outcomes to exit
//! codes (0 done, 1 failed, 2 bad configuration or arguments).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ferry_fleet::config::FleetConfig;
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "ferry-fleet", version, about = "The fleet's side of ferry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks fleet.toml and lists every problem.
    Check {
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
    },
    /// Keeps the latest state of every device in the view's database
    /// (until SIGTERM or SIGINT; then prints its counts).
    View {
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
    },
    /// Prints one device's row of the view.
    Get {
        device: String,
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Prints every row of the view.
    List {
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The view's dead-letter topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Shows what is on the dead-letter topic (not yet replayed).
    List {
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Puts everything on the dead-letter topic back on the retry topic,
    /// for the running views to apply.
    Replay {
        #[arg(long, default_value = "/etc/ferry-fleet/fleet.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_FLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Check { config } => match ferry_fleet::config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} gateways in {})",
                    config.display(),
                    c.gateways.len(),
                    c.namespace()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::View { config } => with_config(&config, view),
        Command::Get {
            device,
            config,
            json,
        } => with_config(&config, |c| get(c, &device, json)),
        Command::List { config, json } => with_config(&config, |c| list(c, json)),
        Command::Dlq {
            command: DlqCommand::List { config, json },
        } => with_config(&config, |c| dlq_list(c, json)),
        Command::Dlq {
            command: DlqCommand::Replay { config },
        } => with_config(&config, dlq_replay),
    }
}

/// Loads the config (exit 2 if it is bad) and runs `f` (exit 0 or 1).
fn with_config(path: &Path, f: impl FnOnce(&FleetConfig) -> anyhow::Result<()>) -> ExitCode {
    let config = match ferry_fleet::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match f(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-fleet: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A stop signal: true on the first SIGTERM or SIGINT.
fn on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

fn view(config: &FleetConfig) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let stop = on_signals()?;
        let counts = Arc::new(ferry_fleet::view::Counts::default());
        let r = ferry_fleet::view::run(config, counts.clone(), stop).await;
        println!("view stopped: {}", counts.snapshot());
        Ok(r?)
    })
}

fn open_view(config: &FleetConfig) -> anyhow::Result<Box<dyn ferry_fleet::db::ViewStore>> {
    Ok(ferry_fleet::db::open(&config.view.database)?)
}

fn get(config: &FleetConfig, device: &str, json: bool) -> anyhow::Result<()> {
    let Some(row) = open_view(config)?.get(device)? else {
        anyhow::bail!("no device {device} in the view");
    };
    if json {
        println!("{}", serde_json::to_string(&row)?);
    } else {
        print!("{}", row.to_text());
    }
    Ok(())
}

fn list(config: &FleetConfig, json: bool) -> anyhow::Result<()> {
    let rows = open_view(config)?.list()?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", ferry_fleet::db::table(&rows));
    }
    Ok(())
}

fn dlq_list(config: &FleetConfig, json: bool) -> anyhow::Result<()> {
    let dead = runtime()?.block_on(ferry_fleet::dlq::list(config))?;
    if json {
        println!("{}", serde_json::to_string(&dead)?);
    } else {
        print!("{}", ferry_fleet::dlq::table(&dead));
    }
    Ok(())
}

fn dlq_replay(config: &FleetConfig) -> anyhow::Result<()> {
    let n = runtime()?.block_on(async {
        let stop = on_signals()?;
        anyhow::Ok(ferry_fleet::dlq::replay(config, stop).await?)
    })?;
    println!("{n} replayed onto {}", config.retry_topic());
    Ok(())
}
