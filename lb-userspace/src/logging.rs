//! The agent's log: `tracing` events (and the `log` records of the crates that use
//! it, aya-log's datapath records among them) written to standard error, as text for
//! people or as one JSON object per line for log shippers, filtered per module by
//! `RUST_LOG` (default `info`). Set up once by `main`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
/// does not parse falls back to `info`, saying so in the log.
pub fn init(format: LogFormat) {
    let (filter, bad) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|v| (v, e)),
        ),
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
