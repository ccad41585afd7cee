//! The `ferry` command: `run` the agent, `check` a configuration file.
//!
//! Exit codes: 0 success; 1 runtime failure (store unusable, fatal error);
//! 2 invalid configuration or command line; 3 `check --online` found a
//! broker unreachable or refusing; 4 the store was written by a newer
//! ferry (left as it is).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
    /// Show the agent's connections, backlog, drain rate and dead letters,
    /// read from its store without disturbing it.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a starting configuration for one gateway.
    Init {
        /// The gateway's id: stable, unique in the fleet.
        #[arg(long)]
        gateway_id: String,
        /// Where to write it (refuses to overwrite); standard output if absent.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Read the audit trail: `verify` its chain, or `tail` its last events.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
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

#[derive(Subcommand)]
enum AuditAction {
    /// Check every line's number and hash; exits 1 naming the first broken
    /// line.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the last events, oldest first.
    Tail {
        #[arg(long, short)]
        config: PathBuf,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_ONLINE: u8 = 3;
/// The store's schema is newer than this binary knows (a downgrade).
const EXIT_STORE_TOO_NEW: u8 = 4;

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
        Command::Init { gateway_id, output } => init(&gateway_id, output.as_deref()),
        Command::Status { config, json } => status(&config, json),
        Command::Audit { action } => audit(action),
        Command::Run { config } => {
            let cfg = match load_with_store(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let log = init_logging(&cfg.log_level);
            match run(cfg, config, log) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "ferry failed");
                    let too_new = e.downcast_ref::<ferry::RunError>().is_some_and(|e| {
                        matches!(
                            e,
                            ferry::RunError::Store(ferry::store::StoreError::TooNew { .. })
                        )
                    });
                    ExitCode::from(if too_new {
                        EXIT_STORE_TOO_NEW
                    } else {
                        EXIT_FAILURE
                    })
                }
            }
        }
    }
}

fn audit(action: AuditAction) -> ExitCode {
    let (AuditAction::Verify { config } | AuditAction::Tail { config, .. }) = &action;
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = &cfg.audit.dir;
    match action {
        AuditAction::Verify { .. } => match ferry::audit::verify::verify(dir) {
            Ok(v) if v.files == 0 => {
                println!("audit: no audit files in {}", dir.display());
                ExitCode::SUCCESS
            }
            Ok(v) => {
                println!(
                    "audit: intact: {} lines in {} file(s), seq {} to {}{}",
                    v.lines,
                    v.files,
                    v.first_seq,
                    v.last_seq,
                    if v.anchored {
                        " (older files were rotated away; checked from the oldest kept)"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(broken) => {
                eprintln!("audit: BROKEN at {broken}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        AuditAction::Tail { lines, .. } => match ferry::audit::verify::tail(dir, lines) {
            Ok(out) => {
                for l in out {
                    println!("{}", ferry::status::printable(&l));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("audit: cannot read {}: {e}", dir.display());
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

fn status(path: &std::path::Path, json: bool) -> ExitCode {
    let cfg = match load_with_store(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match ferry::status::read(&cfg.store.path) {
        Ok(report) if json => {
            println!("{}", ferry::status::render_json(&report));
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", ferry::status::render(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot read the store {}: {e}", cfg.store.path.display());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The store and SQLite's files beside it must be regular files where they
/// exist: opening a FIFO blocks forever, a directory or device fails
/// obscurely. Checked before anything opens them.
fn store_files_usable(store: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let mut paths = vec![store.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal", ".reserve"] {
        let mut p = store.as_os_str().to_owned();
        p.push(suffix);
        paths.push(PathBuf::from(p));
    }
    for p in paths {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        let t = meta.file_type();
        let kind = if t.is_file() {
            continue;
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a file"
        };
        return Err(format!("{} is {kind}, not a regular file", p.display()));
    }
    Ok(())
}

/// The commented example configuration, with the gateway id filled in.
fn init(gateway_id: &str, output: Option<&std::path::Path>) -> ExitCode {
    const TEMPLATE: &str = include_str!("../config/ferry.toml");
    const PLACEHOLDER: &str = "gateway_id = \"gw-0001\"";
    let text = TEMPLATE.replacen(PLACEHOLDER, &format!("gateway_id = \"{gateway_id}\""), 1);
    if let Err(errors) = ferry::config::parse(&text) {
        for e in errors {
            eprintln!("{e}");
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    match output {
        None => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
            match written {
                Ok(()) => {
                    eprintln!(
                        "wrote {}; edit it, then run: ferry check --config {}",
                        path.display(),
                        path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot write {}: {e}", path.display());
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

/// Loads the configuration, or prints every problem and gives exit code 2.
fn load(path: &std::path::Path) -> Result<ferry::config::Config, ExitCode> {
    ferry::config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// [`load`], and a store path that is a regular file (or none yet): exit
/// code 2 otherwise, before anything opens it.
fn load_with_store(path: &std::path::Path) -> Result<ferry::config::Config, ExitCode> {
    let cfg = load(path)?;
    if let Err(e) = store_files_usable(&cfg.store.path) {
        eprintln!("{}: store.path: {e}", path.display());
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(cfg)
}

fn check(path: &std::path::Path, online: bool) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("{}: ok (gateway {})", path.display(), cfg.gateway_id);
    for s in &cfg.streams {
        let subs = s.subscriptions.len();
        let history = s
            .history_topic
            .as_ref()
            .map(|h| format!(", history {h}"))
            .unwrap_or_default();
        println!(
            "  stream {} ({}, overflow {}): {subs} subscription{} -> {}{history}",
            s.name,
            match s.kind {
                ferry::config::StreamKind::State => "state",
                ferry::config::StreamKind::Events => "events",
            },
            s.overflow.as_str(),
            if subs == 1 { "" } else { "s" },
            s.topic
        );
    }
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
    let mut probes = rt.block_on(ferry::check::online(&cfg));
    probes.extend(ferry::check::deduplication(&cfg));
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

type LogHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn run(cfg: ferry::config::Config, path: PathBuf, log: LogHandle) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    use ferry::audit::{self, Event};
    audit::install(audit::AuditLog::open(&cfg.audit)?);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    Event::new("start")
        .field("version", env!("CARGO_PKG_VERSION"))
        .field("pid", std::process::id())
        .field("config", path.display().to_string())
        .field("config_sha256", audit::chain::sha256_hex(text.as_bytes()))
        .record();
    let result = rt.block_on(async {
        let token = CancellationToken::new();
        ferry::shutdown::on_signals(token.clone())?;
        let (reload_tx, reload_rx) = tokio::sync::watch::channel(cfg.clone());
        let mut hangup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                ferry::notify::notify("RELOADING=1");
                let new_text = std::fs::read_to_string(&path).unwrap_or_default();
                let hashes = |e: Event| {
                    e.field("old_sha256", audit::chain::sha256_hex(text.as_bytes()))
                        .field("new_sha256", audit::chain::sha256_hex(new_text.as_bytes()))
                };
                match ferry::config::load(&path) {
                    Ok(new) => {
                        hashes(Event::new("reload"))
                            .field("changed", ferry::config::changed_keys(&text, &new_text))
                            .field("needs_restart", cfg_restart(&reload_tx, &new))
                            .record();
                        text = new_text;
                        if std::env::var_os("RUST_LOG").is_none() {
                            let _ = log.reload(EnvFilter::new(&new.log_level));
                        }
                        let _ = reload_tx.send(new);
                    }
                    Err(e) => {
                        hashes(Event::new("reload-refused"))
                            .field("problems", e.errors.len())
                            .record();
                        tracing::error!("reload refused, keeping the running configuration: {e}")
                    }
                }
                ferry::notify::notify("READY=1");
            }
        });
        ferry::run(cfg, token, reload_rx).await?;
        Ok::<_, anyhow::Error>(())
    });
    Event::new("stop")
        .field("version", env!("CARGO_PKG_VERSION"))
        .field(
            "outcome",
            match &result {
                Ok(()) => "clean".to_string(),
                Err(e) => format!("failed: {e}"),
            },
        )
        .record();
    audit::uninstall();
    result
}

/// The parts of a reloaded configuration that only a restart applies.
fn cfg_restart(
    current: &tokio::sync::watch::Sender<ferry::config::Config>,
    new: &ferry::config::Config,
) -> Vec<&'static str> {
    current.borrow().needs_restart(new)
}

/// Logs to stderr at `level` (`RUST_LOG` overrides it). Under systemd
/// (`JOURNAL_STREAM` set) without timestamps: journald adds its own.
fn init_logging(level: &str) -> LogHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(fmt.without_time()).init();
    } else {
        registry.with(fmt).init();
    }
    handle
}
