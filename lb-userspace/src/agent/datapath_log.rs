//! The datapath's records in the agent's log: a task that writes them through the
//! `log` crate (target [`lb_common::maps::LOG_TARGET`]) as soon as aya-log's ring
//! buffer has some. Started by the agent right after it loads the program, unless
//! `--datapath-log` is `off` (then the program makes none).

use tokio::io::{Interest, unix::AsyncFd};

use super::AgentError;
use crate::dataplane::Dataplane;

/// Takes the datapath's records from `dataplane` and starts the task that reads them
/// into the agent's log; it runs as long as the runtime does.
pub fn start_reader(dataplane: &mut Dataplane) -> Result<(), AgentError> {
    let records = dataplane.take_log(log::logger())?;
    // SAFETY: the logger owns the ring buffer's map descriptor for its whole life and
    // always returns that one from `as_raw_fd`; the `AsyncFd` owns the logger.
    let mut records = unsafe { AsyncFd::register_with_interest(records, Interest::READABLE) }
        .map_err(|e| AgentError::DatapathLog(e.into()))?;
    tokio::spawn(async move {
        while let Ok(mut ready) = records.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}
