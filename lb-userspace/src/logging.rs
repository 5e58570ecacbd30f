//! The agent's log: `tracing` events (and the `log` records of the crates that use
//! it, aya-log's datapath records among them) written to standard error, as text for
//! people or as one JSON object per line for log shippers, filtered per module by
//! `RUST_LOG` (default `info`). Set up once by `main`.

use std::io::IsTerminal;

use lb_common::maps::LOG_TARGET;
use tracing_subscriber::{EnvFilter, filter::Directive};

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event: time, level, module, message and fields.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level.
    Json,
}

/// Installs the subscriber (once; a second call changes nothing). A `RUST_LOG` that
/// does not parse falls back to `info`, saying so in the log. The datapath's records
/// (target [`LOG_TARGET`]) are shown down to `datapath`, the level the program was
/// loaded with, unless `RUST_LOG` names that target itself.
pub fn init(format: LogFormat, datapath: log::LevelFilter) {
    let (filter, bad) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|v| (v, e)),
        ),
    };
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains(LOG_TARGET));
    let directive = format!("{LOG_TARGET}={}", datapath.as_str().to_lowercase());
    let filter = match directive.parse::<Directive>() {
        Ok(d) if !named && datapath != log::LevelFilter::Off => filter.add_directive(d),
        _ => filter,
    };
    // Colours only for a person at a terminal: not in a file, a pipe or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_ok()
        && let Some((value, e)) = bad
        && !value.is_empty()
    {
        tracing::warn!(rust_log = %value, error = %e, "RUST_LOG does not parse; logging at info");
    }
}
