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
    /// With `[[pulsar.clusters]]`: the cluster to talk to (default: the
    /// first; `provision` declares in every one unless given).
    #[arg(long, global = true)]
    cluster: Option<String>,
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
    /// Keeps the latest state of every device in the view's database
    /// (until SIGTERM or SIGINT; then prints its counts), and serves
    /// `GET /devices/{id}` and `/metrics` (its counts, the lag) meanwhile.
    View {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where to serve, instead of `[view] listen` (port 0: any).
        #[arg(long)]
        listen: Option<String>,
        /// The view's database, instead of `[view] database` (one per
        /// cluster, with `--cluster`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Serves `GET /devices/{id}` and `/metrics` (the lag) from the view's
    /// database without consuming (until SIGTERM or SIGINT).
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where to serve, instead of `[view] listen` (port 0: any).
        #[arg(long)]
        listen: Option<String>,
        /// The view's database, instead of `[view] database` (one per
        /// cluster, with `--cluster`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Rebuilds the view from the compacted status topics (never takes a
    /// row back); prints what it read, applied and found stale.
    Replay {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The database to fill, instead of `[view] database`.
        #[arg(long)]
        database: Option<String>,
    },
    /// Prints one device's row of the view.
    Get {
        device: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// The view's database, instead of `[view] database` (one per
        /// cluster, with `--cluster`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Prints every row of the view.
    List {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// The view's database, instead of `[view] database` (one per
        /// cluster, with `--cluster`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Writes a device's desired state (the document on stdin; empty
    /// clears it) to its gateway's desired topic as its next version,
    /// exactly once; the same document again writes nothing.
    Desire {
        device: String,
        #[arg(long)]
        gateway: String,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Copies the gateways' records from one cluster to another that lost
    /// them (a region brought back empty), each with its producer name and
    /// sequence id, so that each is there once and the gateways, which hold
    /// that cluster's records meanwhile, go on after them.
    Refill {
        /// The cluster that kept the records.
        #[arg(long)]
        from: String,
        /// The cluster that lost them.
        #[arg(long)]
        to: String,
        /// Only these topics (default: every topic of every gateway of
        /// fleet.toml).
        #[arg(long = "topic")]
        topics: Vec<String>,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Puts everything on the dead-letter topic back on the retry topic,
    /// for the running views to apply.
    Replay {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Loads fleet.toml, talking to the cluster `--cluster` names (if given),
/// or says why not (exit 2).
fn load(path: &Path, cluster: Option<&str>) -> Result<FleetConfig, ExitCode> {
    let c = ferry_fleet::config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })?;
    match cluster {
        None => Ok(c),
        Some(name) => pick(&c, path, name),
    }
}

/// `c` talking to cluster `name`, or says why not (exit 2).
fn pick(c: &FleetConfig, path: &Path, name: &str) -> Result<FleetConfig, ExitCode> {
    c.on_cluster(name).ok_or_else(|| {
        eprintln!(
            "--cluster {name}: {} names no such cluster (its clusters: {})",
            path.display(),
            match c.cluster_names() {
                n if n.is_empty() => "one, without a name".to_string(),
                n => n.join(", "),
            }
        );
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
    match run(cli.command, cli.cluster.as_deref()) {
        Ok(code) | Err(code) => code,
    }
}

fn run(command: Command, cluster: Option<&str>) -> Result<ExitCode, ExitCode> {
    match command {
        Command::Check { config: path } => {
            let c = load(&path, cluster)?;
            println!(
                "{}: ok ({} gateways in {})",
                path.display(),
                c.gateways.len(),
                c.namespace()
            );
        }
        Command::Provision { config, dry_run } => {
            // Every cluster: `provision_clusters` picks `--cluster`.
            let c = load(&config, None)?;
            if let Some(name) = cluster {
                pick(&c, &config, name)?;
            }
            let runtime = tokio::runtime::Runtime::new().map_err(|e| {
                eprintln!("provision: cannot start: {e}");
                ExitCode::from(1)
            })?;
            let mut out = std::io::stdout();
            runtime
                .block_on(ferry_fleet::provision::provision_clusters(
                    &c, cluster, dry_run, &mut out,
                ))
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
            let c = load(&config, cluster)?;
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
            let c = load(&config, cluster)?;
            let text = ferry_fleet::gateway_config::render(&c, &gateway).map_err(|e| {
                eprintln!("gateway-config: {e}");
                ExitCode::from(2)
            })?;
            print!("{text}");
        }
        Command::View {
            config,
            listen,
            database,
        } => {
            return Ok(with_config(&config, cluster, |c| {
                view(&on_database(c, database), listen.as_deref())
            }))
        }
        Command::Serve {
            config,
            listen,
            database,
        } => {
            return Ok(with_config(&config, cluster, |c| {
                serve(&on_database(c, database), listen.as_deref())
            }))
        }
        Command::Replay { config, database } => {
            return Ok(with_config(&config, cluster, |c| {
                replay(c, database.as_deref())
            }))
        }
        Command::Get {
            device,
            config,
            json,
            database,
        } => {
            return Ok(with_config(&config, cluster, |c| {
                get(&on_database(c, database), &device, json)
            }))
        }
        Command::List {
            config,
            json,
            database,
        } => {
            return Ok(with_config(&config, cluster, |c| {
                list(&on_database(c, database), json)
            }))
        }
        Command::Desire {
            device,
            gateway,
            config,
        } => {
            let c = load(&config, cluster)?;
            return Ok(desire(&c, &gateway, &device));
        }
        Command::Refill {
            from,
            to,
            topics,
            config,
        } => {
            let c = load(&config, None)?;
            return Ok(refill(&c, &from, &to, topics));
        }
        Command::Dlq {
            command: DlqCommand::List { config, json },
        } => return Ok(with_config(&config, cluster, |c| dlq_list(c, json))),
        Command::Dlq {
            command: DlqCommand::Replay { config },
        } => return Ok(with_config(&config, cluster, dlq_replay)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the config (exit 2 if it is bad) and runs `f` (exit 0 or 1).
fn with_config(
    path: &Path,
    cluster: Option<&str>,
    f: impl FnOnce(&FleetConfig) -> anyhow::Result<()>,
) -> ExitCode {
    let config = match load(path, cluster) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match f(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-fleet: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `c` with the view in `database`, if given.
fn on_database(c: &FleetConfig, database: Option<String>) -> FleetConfig {
    let mut c = c.clone();
    if let Some(d) = database {
        c.view.database = d;
    }
    c
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

fn view(config: &FleetConfig, listen: Option<&str>) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let stop = on_signals()?;
        let counts = Arc::new(ferry_fleet::view::Counts::default());
        let server = ferry_fleet::serve::Server::bind(
            config,
            listen.unwrap_or(&config.view.listen),
            Some(counts.clone()),
        )
        .await?;
        tracing::info!(addr = %server.local_addr()?, "view: serving /devices and /metrics");
        let (server_stop, server_stopped) = watch::channel(false);
        let serving = tokio::spawn(server.run(server_stopped));
        let r = ferry_fleet::view::run(config, counts.clone(), stop).await;
        let _ = server_stop.send(true);
        let _ = serving.await;
        println!("view stopped: {}", counts.snapshot());
        Ok(r?)
    })
}

fn serve(config: &FleetConfig, listen: Option<&str>) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let stop = on_signals()?;
        let server =
            ferry_fleet::serve::Server::bind(config, listen.unwrap_or(&config.view.listen), None)
                .await?;
        println!("serving on http://{}", server.local_addr()?);
        Ok(server.run(stop).await?)
    })
}

fn replay(config: &FleetConfig, database: Option<&str>) -> anyhow::Result<()> {
    let report = runtime()?.block_on(async {
        let stop = on_signals()?;
        anyhow::Ok(ferry_fleet::replay::replay(config, database, stop).await?)
    })?;
    println!("{report}");
    if report.interrupted {
        anyhow::bail!("replay interrupted");
    }
    Ok(())
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

/// `desire`: the document from stdin; exit 2 for a gateway not in
/// fleet.toml or a device id the agent would refuse.
fn desire(config: &FleetConfig, gateway: &str, device: &str) -> ExitCode {
    use std::io::Read as _;
    let mut document = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut document) {
        eprintln!("desire: cannot read the document from stdin: {e}");
        return ExitCode::from(1);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("desire: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(ferry_fleet::desire::desire(
        config, gateway, device, document,
    )) {
        Ok(outcome) => {
            println!("{}", outcome.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("desire: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

/// `refill`: exit 2 for a cluster fleet.toml does not name.
fn refill(config: &FleetConfig, from: &str, to: &str, topics: Vec<String>) -> ExitCode {
    let topics = if topics.is_empty() {
        ferry_fleet::refill::fleet_topics(config)
    } else {
        topics
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("refill: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout();
    match runtime.block_on(ferry_fleet::refill::refill(
        config, from, to, &topics, &mut out,
    )) {
        Ok(done) => {
            let copied: u64 = done.iter().map(|t| t.copied).sum();
            println!(
                "refilled {to} from {from}: {} topics, {copied} messages copied",
                done.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("refill: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
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
