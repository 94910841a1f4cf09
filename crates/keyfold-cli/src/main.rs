#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod audit;
mod cli;
mod config;
mod error;
mod globals;
mod inspect;
mod kek;
mod keyring;
mod probe;
mod rewrap;
#[cfg(feature = "postgres")]
mod rewrap_pg;
mod sqlite;
mod ui;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command, KekCommand, RewrapCommand};
use crate::error::CliError;
use crate::globals::Globals;
use crate::ui::Output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = Output { json: cli.json };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output.error(&e);
            ExitCode::from(e.kind.code())
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let output = Output { json: cli.json };
    // Commands that need neither a config nor a runtime.
    match &cli.command {
        Command::Kek(KekCommand::Generate { out }) => return kek::generate(out, output),
        Command::Inspect { file } => return inspect::run(file, output),
        _ => {}
    }
    let globals = Globals::new(&cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        match cli.command {
            Command::Keyring(cmd) => keyring::run(cmd, &globals).await,
            Command::Probe { keyring } => probe::run(keyring, &globals).await,
            Command::Rewrap(RewrapCommand::Run {
                job,
                restart,
                batch_size,
                pause_ms,
            }) => {
                rewrap::run(
                    &job,
                    restart,
                    batch_size,
                    Duration::from_millis(pause_ms),
                    &globals,
                )
                .await
            }
            Command::Rewrap(RewrapCommand::Status { job, evidence_for }) => {
                rewrap::status(&job, evidence_for, &globals).await
            }
            Command::Kek(_) | Command::Inspect { .. } => Ok(()),
        }
    })
}
