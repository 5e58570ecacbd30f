//! `lb top`: backends, weights and rates (packets/s, bytes/s, new flows/s, per
//! backend and in total), refreshed every second. On a terminal each refresh
//! replaces the last; into a pipe or a file each is printed after the last, with no
//! escape codes; with `--json`, one JSON object per line and refresh.

use std::{io::IsTerminal, path::Path, time::Duration};

use crate::{
    api::{BackendView, Request, Stats},
    control,
};

use super::{
    CliError,
    args::Format,
    output::{Align, Out, Table, bytes, duration, ms, rate, weight},
    rates::{self, Rates},
};

/// Clears the screen and moves the cursor home, as `top` does.
const CLEAR: &str = "\x1b[2J\x1b[H";

/// Runs `lb top` for `count` refreshes (0: until interrupted).
pub fn run(
    out: &mut Out<impl std::io::Write>,
    socket: &Path,
    instance: &str,
    count: u32,
    format: Format,
) -> Result<(), CliError> {
    let terminal = std::io::stdout().is_terminal();
    let mut previous: Stats = control::request(socket, Request::Stats)?;
    let mut shown = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now: Stats = control::request(socket, Request::Stats)?;
        let r = rates::between(&previous, &now);
        if format.json {
            out.json_line(&r)?;
        } else {
            let frame = frame(instance, &now, &r);
            match terminal {
                true => out.line(&format!("{CLEAR}{frame}"))?,
                false => out.line(&format!("{frame}\n"))?,
            }
        }
        previous = now;
        shown += 1;
        if count != 0 && shown >= count {
            return Ok(());
        }
    }
}

/// One refresh: a title, the totals, and the backends with their rates.
pub fn frame(instance: &str, now: &Stats, r: &Rates) -> String {
    format!(
        "lb top: instance {instance}, agent up {}, rates over the last {:.1} s\n{}\n\n{}",
        duration(now.uptime_ms / 1000),
        r.seconds,
        rates::totals(r),
        table(&now.backends, r)
    )
}

fn table(views: &[BackendView], r: &Rates) -> String {
    let mut t = Table::new(&[
        ("VIP", Align::Left),
        ("backend", Align::Left),
        ("weight", Align::Right),
        ("set by", Align::Left),
        ("health", Align::Left),
        ("latency ms", Align::Right),
        ("predicted ms", Align::Right),
        ("packets/s", Align::Right),
        ("bytes/s", Align::Right),
        ("new flows/s", Align::Right),
    ]);
    for b in views {
        let rate_of = r
            .backends
            .iter()
            .find(|x| x.vip == b.vip && x.backend == b.backend);
        let per_s = |f: fn(&rates::BackendRate) -> f64| rate_of.map_or(0.0, f);
        t.row(vec![
            b.vip.clone(),
            b.backend.to_string(),
            weight(b.weight),
            b.control.to_string(),
            super::read::health(b.healthy).to_owned(),
            ms(b.latency_ms),
            ms(b.predicted_ms),
            rate(per_s(|x| x.packets_per_second)),
            bytes(per_s(|x| x.bytes_per_second)),
            rate(per_s(|x| x.new_flows_per_second)),
        ]);
    }
    t.row(vec![
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        rate(r.packets_per_second),
        bytes(r.bytes_per_second),
        rate(r.backends.iter().map(|b| b.new_flows_per_second).sum()),
    ]);
    t.render()
}
