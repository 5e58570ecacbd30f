//! `lb stats`: rates per second between two `stats` answers, in total and per
//! backend, and their text. `lb top` shows the same rates, refreshed.

use std::{net::IpAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    api::{Request, Stats},
    control,
};

use super::{
    CliError,
    args::Format,
    output::{Align, Out, Table, bytes, rate, weight},
};

/// Rates over an interval, as `lb stats --json` prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// The interval, by the agent's clock.
    pub seconds: f64,
    /// Every frame the datapath saw.
    pub frames_per_second: f64,
    /// New flows (SYNs that took the lookup table, new UDP flows).
    pub new_flows_per_second: f64,
    /// Packets of unknown flows without SYN: flows that may break.
    pub non_syn_misses_per_second: f64,
    /// Frames sent to all backends.
    pub packets_per_second: f64,
    /// Bytes sent to all backends.
    pub bytes_per_second: f64,
    pub backends: Vec<BackendRate>,
}

/// One backend's rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendRate {
    pub vip: String,
    pub backend: IpAddr,
    /// The weight in force at the end of the interval, in configured units.
    pub weight: f64,
    pub packets_per_second: f64,
    pub new_flows_per_second: f64,
    pub bytes_per_second: f64,
}

/// The rates from `first` to `second` (counters that went back count as 0).
pub fn between(first: &Stats, second: &Stats) -> Rates {
    let secs = (second.uptime_ms.saturating_sub(first.uptime_ms) as f64 / 1000.0).max(0.001);
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let (a, b) = (&first.datapath, &second.datapath);
    let backends: Vec<BackendRate> = second
        .backends
        .iter()
        .map(|now| {
            let then = first
                .backends
                .iter()
                .find(|x| x.vip == now.vip && x.backend == now.backend);
            let was = |f: fn(&crate::api::BackendView) -> u64| then.map_or(0, f);
            BackendRate {
                vip: now.vip.clone(),
                backend: now.backend,
                weight: now.weight,
                packets_per_second: per_s(was(|x| x.packets), now.packets),
                new_flows_per_second: per_s(was(|x| x.new_flows), now.new_flows),
                bytes_per_second: per_s(was(|x| x.bytes), now.bytes),
            }
        })
        .collect();
    Rates {
        seconds: secs,
        frames_per_second: per_s(a.rx_frames, b.rx_frames),
        new_flows_per_second: per_s(a.conn_miss_syn, b.conn_miss_syn),
        non_syn_misses_per_second: per_s(a.conn_miss_non_syn, b.conn_miss_non_syn),
        packets_per_second: backends.iter().map(|r| r.packets_per_second).sum(),
        bytes_per_second: backends.iter().map(|r| r.bytes_per_second).sum(),
        backends,
    }
}

/// The line of totals: `1,234 frames/s in, 56 new flows/s, ...`.
pub fn totals(r: &Rates) -> String {
    format!(
        "datapath: {} frames/s received, {} new flows/s, {} non-SYN misses/s; to backends: \
         {} packets/s, {}/s",
        rate(r.frames_per_second),
        rate(r.new_flows_per_second),
        rate(r.non_syn_misses_per_second),
        rate(r.packets_per_second),
        bytes(r.bytes_per_second)
    )
}

/// `lb stats`: the totals, then a table of backends with a total row.
pub fn text(r: &Rates) -> String {
    let mut t = Table::new(&[
        ("VIP", Align::Left),
        ("backend", Align::Left),
        ("weight", Align::Right),
        ("packets/s", Align::Right),
        ("bytes/s", Align::Right),
        ("new flows/s", Align::Right),
    ]);
    for b in &r.backends {
        t.row(vec![
            b.vip.clone(),
            b.backend.to_string(),
            weight(b.weight),
            rate(b.packets_per_second),
            bytes(b.bytes_per_second),
            rate(b.new_flows_per_second),
        ]);
    }
    t.row(vec![
        "total".into(),
        String::new(),
        String::new(),
        rate(r.packets_per_second),
        bytes(r.bytes_per_second),
        rate(r.backends.iter().map(|b| b.new_flows_per_second).sum()),
    ]);
    format!("over {:.1} s\n{}\n\n{}", r.seconds, totals(r), t.render())
}

/// `lb stats`: two samples `interval` seconds apart.
pub fn stats(
    out: &mut Out<impl std::io::Write>,
    socket: &Path,
    interval: f64,
    format: Format,
) -> Result<(), CliError> {
    let first: Stats = control::request(socket, Request::Stats)?;
    std::thread::sleep(Duration::from_secs_f64(interval.clamp(0.1, 3600.0)));
    let second: Stats = control::request(socket, Request::Stats)?;
    let rates = between(&first, &second);
    match format.json {
        true => out.json(&rates)?,
        false => out.line(&text(&rates))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendView, Control, DatapathCounters};

    fn sample(ms: u64, packets: u64, bytes: u64) -> Stats {
        Stats {
            uptime_ms: ms,
            datapath: DatapathCounters {
                rx_frames: packets,
                conn_miss_syn: packets / 10,
                ..DatapathCounters::default()
            },
            backends: ["198.18.0.11", "198.18.0.12"]
                .iter()
                .map(|a| BackendView {
                    vip: "198.18.1.1:80/tcp".into(),
                    backend: a.parse().unwrap(),
                    mac: String::new(),
                    configured_weight: 1,
                    weight: 1.0,
                    control: Control::Policy,
                    packets: packets / 2,
                    bytes: bytes / 2,
                    new_flows: packets / 20,
                    healthy: true,
                    latency_ms: None,
                    predicted_ms: None,
                    predictor: None,
                })
                .collect(),
        }
    }

    #[test]
    fn rates_are_per_second_per_backend_and_in_total() {
        let r = between(&sample(1000, 0, 0), &sample(3000, 4000, 2_000_000));
        assert_eq!(r.seconds, 2.0);
        assert_eq!(r.frames_per_second, 2000.0);
        assert_eq!(r.new_flows_per_second, 200.0);
        assert_eq!(r.backends[0].packets_per_second, 1000.0);
        assert_eq!(r.packets_per_second, 2000.0);
        assert_eq!(r.bytes_per_second, 1_000_000.0);
        let text = text(&r);
        assert!(text.contains("2,000 packets/s, 1.00 MB/s"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("total") && l.contains("2,000")),
            "{text}"
        );
    }
}
