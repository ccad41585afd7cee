//! `ferry-fleet`: the command line. Each command lives in its own module of
//! the library; this file only parses arguments and maps outcomes to exit
//! codes (0 done, 1 failed, 2 bad configuration or arguments).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    }
}
