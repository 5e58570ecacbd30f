//! The `lb` command line's client side: every command but `run`, each sending one
//! request (or two, for rates) to the agent's control socket and printing the typed
//! answer as text or, with `--json`, as the answer's JSON. Called by `main`.
//!
//! # Layout
//! - `args`: the arguments (clap), with the manual in their docs.
//! - `output`: writing (a closed pipe is a quiet stop), aligned tables, number formats.
//! - `read`: the text of `status`, `vip list`, `backend list`, `explain`, `tables`,
//!   `cluster status`.
//! - `change`: what a setting command did, in words (also the agent's log line).
//! - `rates`: `stats`, rates between two samples.
//! - `top`: the live view.

pub mod args;
pub mod change;
pub mod output;
mod rates;
mod read;
mod top;

use std::{io::Write, path::Path, process::ExitCode};

use clap::CommandFactory;
use serde::{Serialize, de::DeserializeOwned};

use self::{
    args::{
        Args, BackendCommand, ClientCommand, ClusterCommand, Format, Target, VipCommand,
        WeightCommand,
    },
    output::{Out, OutputError},
};
use crate::{
    api::{
        self, BackendView, Change, ClusterStatus, Explanation, Request, Status, TableView, VipView,
    },
    control,
};

/// Why a command of `lb` failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] control::ClientError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Agent(#[from] Box<crate::agent::AgentError>),
    #[error("starting the agent's runtime")]
    Runtime(#[source] std::io::Error),
}

impl From<crate::agent::AgentError> for CliError {
    fn from(e: crate::agent::AgentError) -> CliError {
        CliError::Agent(Box::new(e))
    }
}

/// Runs one client command against the agent at `socket`, printing to standard output.
pub fn run(command: ClientCommand, instance: &str, socket: &Path) -> Result<(), CliError> {
    let out = &mut Out::stdout();
    match command {
        ClientCommand::Status(f) => show::<Status>(out, socket, Request::Status, f, read::status),
        ClientCommand::Vip { command, format } => {
            let f = match command {
                Some(VipCommand::List(f)) => either(f, format),
                None => format,
            };
            show::<Vec<VipView>>(out, socket, Request::VipList, f, |v| read::vips(v))
        }
        ClientCommand::Backend { command, format } => {
            let f = match command {
                Some(BackendCommand::List(f)) => either(f, format),
                None => format,
            };
            show::<Vec<BackendView>>(out, socket, Request::BackendList, f, |v| read::backends(v))
        }
        ClientCommand::Weight {
            command: WeightCommand::Show(f),
        } => show::<Vec<BackendView>>(out, socket, Request::BackendList, f, |v| read::backends(v)),
        ClientCommand::Weight { command } => {
            let (request, f) = weight_request(command);
            setting(out, socket, request, f)
        }
        ClientCommand::Drain(t) => {
            let request = Request::Drain {
                backend: t.backend,
                vip: t.vip,
            };
            setting(out, socket, request, t.format)
        }
        ClientCommand::Undrain(t) => {
            let request = Request::Undrain {
                backend: t.backend,
                vip: t.vip,
            };
            setting(out, socket, request, t.format)
        }
        ClientCommand::Reload(f) => setting(out, socket, Request::Reload, f),
        ClientCommand::Explain(f) => {
            show::<Vec<Explanation>>(out, socket, Request::Explain, f, |v| read::explain(v))
        }
        ClientCommand::Tables(f) => {
            show::<Vec<TableView>>(out, socket, Request::Tables, f, |v| read::tables(v))
        }
        ClientCommand::Cluster {
            command: ClusterCommand::Status(f),
        } => show::<ClusterStatus>(out, socket, Request::ClusterStatus, f, read::cluster),
        ClientCommand::Stats { interval, format } => rates::stats(out, socket, interval, format),
        ClientCommand::Top { count, format } => top::run(out, socket, instance, count, format),
        ClientCommand::Detach(f) => detach(out, instance, f),
        ClientCommand::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "lb", &mut script);
            Ok(out.raw(&script)?)
        }
    }
}

/// `--json` given before or after the subcommand (`lb vip --json list`).
fn either(a: Format, b: Format) -> Format {
    Format {
        json: a.json || b.json,
    }
}

/// Asks for `request`'s answer `T` and prints it as text or JSON.
fn show<T: Serialize + DeserializeOwned>(
    out: &mut Out<impl Write>,
    socket: &Path,
    request: Request,
    format: Format,
    text: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    let answer: T = control::request(socket, request)?;
    match format.json {
        true => out.json(&answer)?,
        false => out.line(&text(&answer))?,
    }
    Ok(())
}

/// Sends a setting request and says what it changed.
fn setting(
    out: &mut Out<impl Write>,
    socket: &Path,
    request: Request,
    format: Format,
) -> Result<(), CliError> {
    show::<Change>(out, socket, request, format, |c| {
        change::lines(c).join("\n")
    })
}

fn weight_request(command: WeightCommand) -> (Request, Format) {
    let target = |t: Target| (t.backend, t.vip, t.format);
    match command {
        WeightCommand::Set { target: t, weight } => {
            let (backend, vip, f) = target(t);
            (
                Request::WeightSet {
                    backend,
                    vip,
                    weight,
                },
                f,
            )
        }
        WeightCommand::Pin { target: t, weight } => {
            let (backend, vip, f) = target(t);
            (
                Request::WeightPin {
                    backend,
                    vip,
                    weight,
                },
                f,
            )
        }
        WeightCommand::Unpin(t) | WeightCommand::Auto(t) => {
            let (backend, vip, f) = target(t);
            (Request::WeightAuto { backend, vip }, f)
        }
        WeightCommand::Show(f) => (Request::BackendList, f),
    }
}

/// What `lb detach --json` prints.
#[derive(Serialize)]
struct Detached {
    instance: String,
    detached: bool,
    /// The pin directory that was removed.
    pins: std::path::PathBuf,
}

fn detach(out: &mut Out<impl Write>, instance: &str, format: Format) -> Result<(), CliError> {
    crate::agent::detach(instance)?;
    let done = Detached {
        instance: instance.to_owned(),
        detached: true,
        pins: crate::agent::pin_dir(instance),
    };
    match format.json {
        true => out.json(&done)?,
        false => out.line(&format!(
            "instance {instance}: detached; removed the pins under {}",
            done.pins.display()
        ))?,
    }
    Ok(())
}

/// The process's exit status for a command's result, after saying what went wrong:
/// 0 on success and when the reader of standard output went away (`lb status |
/// head -1`), 2 for a configuration error, 1 for any other error. The error is
/// printed with each cause once (see [`api::error_text`]).
pub fn finish(result: Result<(), CliError>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    if let CliError::Output(OutputError::Closed) = e {
        return ExitCode::SUCCESS;
    }
    // Standard error may be closed too; there is nothing left to tell then.
    let _ = writeln!(std::io::stderr(), "lb: error: {}", api::error_text(&e));
    let config_error =
        matches!(&e, CliError::Agent(a) if matches!(**a, crate::agent::AgentError::Config(_)));
    ExitCode::from(if config_error { 2 } else { 1 })
}
