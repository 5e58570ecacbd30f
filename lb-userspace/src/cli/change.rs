//! What a setting command (`weight set|pin|auto`, `drain`, `undrain`, `reload`) did,
//! in words: `backend 198.18.0.11 (VIP 198.18.1.1:80/tcp): weight 1 → 0 (drained: no
//! new flows, established ones continue), 21,845 slots moved to 198.18.0.12`. Used by
//! the `lb` commands and by the agent's log line for each operator action.

use crate::api::{BackendChange, Change, Control, SlotMove, VipChange, VipChangeKind};

use super::output::{count, percent, weight};

/// The change as lines of text: the named backend's line (or, for `reload`, the action
/// first), each other backend that changed, and the VIPs whose moves those lines do
/// not already tell.
pub fn lines(change: &Change) -> Vec<String> {
    let named = change.backends.iter().find(|b| b.named);
    if !change.changed {
        let note = change.note.as_deref().unwrap_or("nothing to change");
        return vec![match named {
            Some(b) => format!("{}: {note}; nothing changed", who(b)),
            None => format!("{}: nothing changed", change.action),
        }];
    }
    let mut out = Vec::new();
    if named.is_none() {
        out.push(change.action.clone());
    }
    let indent = if named.is_none() { "  " } else { "" };
    for b in &change.backends {
        out.push(format!("{indent}{}", backend_line(b)));
    }
    for v in &change.vips {
        if let Some(line) = vip_line(v, &change.backends) {
            out.push(format!("{indent}{line}"));
        }
    }
    if named.is_none() && out.len() == 1 {
        out[0].push_str(": no weight changed");
    }
    if let Some(note) = &change.note {
        // A fleet hold: what it will do, and when.
        out.push(format!("{indent}{note}"));
    }
    out
}

fn who(b: &BackendChange) -> String {
    format!("backend {} (VIP {})", b.backend, b.vip)
}

/// `backend B (VIP V): weight 1 → 0 (drained: ...), 21,845 slots moved to X`.
fn backend_line(b: &BackendChange) -> String {
    let w = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), weight);
    format!(
        "{}: weight {} → {} ({}), {}",
        who(b),
        w(b.weight_before),
        w(b.weight),
        control_words(b.control_before, b.control),
        slots_words(b)
    )
}

/// Who decides the weight now, said against who decided it before.
fn control_words(before: Option<Control>, after: Option<Control>) -> &'static str {
    match (before, after) {
        (_, None) => "removed",
        (None, Some(_)) => "added",
        (Some(Control::Drained), Some(Control::Policy)) => "undrained, back to the policy",
        (Some(a), Some(Control::Policy)) if a != Control::Policy => "back to the policy",
        (_, Some(Control::Policy)) => "by the policy",
        (_, Some(Control::Set)) => "held until `weight auto` or a reload",
        (_, Some(Control::Pinned)) => "pinned until `weight auto`",
        (_, Some(Control::Drained)) => "drained: no new flows, established ones continue",
    }
}

/// `21,845 slots moved to X (10,923) and Y (10,922)`, `no slot moved`.
fn slots_words(b: &BackendChange) -> String {
    let mut parts = Vec::new();
    for (moves, direction) in [(&b.moved_to, "to"), (&b.moved_from, "from")] {
        if !moves.is_empty() {
            let total: usize = moves.iter().map(|m| m.slots).sum();
            parts.push(format!(
                "{} {} moved {direction} {}",
                count(total as u64),
                if total == 1 { "slot" } else { "slots" },
                backends_words(moves)
            ));
        }
    }
    if parts.is_empty() {
        return "no slot moved".to_owned();
    }
    parts.join(", ")
}

/// `X`, `X (5) and Y (3)`, `X (5), Y (3), Z (2) and 4 others (4)`.
fn backends_words(moves: &[SlotMove]) -> String {
    const NAMED: usize = 3;
    if let [one] = moves {
        return one.backend.to_string();
    }
    let mut names: Vec<String> = moves
        .iter()
        .take(NAMED)
        .map(|m| format!("{} ({})", m.backend, count(m.slots as u64)))
        .collect();
    if moves.len() > NAMED {
        let rest = &moves[NAMED..];
        let slots: usize = rest.iter().map(|m| m.slots).sum();
        let others = if rest.len() == 1 { "other" } else { "others" };
        names.push(format!("{} {others} ({})", rest.len(), count(slots as u64)));
    }
    let last = names.pop().unwrap_or_default();
    if names.is_empty() {
        last
    } else {
        format!("{} and {last}", names.join(", "))
    }
}

/// A VIP's line, unless the one backend line of that VIP already tells its moves.
fn vip_line(v: &VipChange, backends: &[BackendChange]) -> Option<String> {
    match v.change {
        VipChangeKind::Added => Some(format!(
            "VIP {}: added, {} slots",
            v.vip,
            count(v.size as u64)
        )),
        VipChangeKind::Removed => Some(format!("VIP {}: removed", v.vip)),
        VipChangeKind::Changed => {
            let listed: Vec<&BackendChange> = backends.iter().filter(|b| b.vip == v.vip).collect();
            let told = match listed.as_slice() {
                [one] => {
                    let moved: usize = one
                        .moved_to
                        .iter()
                        .chain(&one.moved_from)
                        .map(|m| m.slots)
                        .sum();
                    moved == v.slots_moved
                }
                _ => false,
            };
            (!told).then(|| {
                format!(
                    "VIP {}: {} of {} slots moved in all ({})",
                    v.vip,
                    count(v.slots_moved as u64),
                    count(v.size as u64),
                    percent(v.slots_moved as f64, v.size as f64)
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str) -> BackendChange {
        BackendChange {
            vip: "198.18.1.1:80/tcp".into(),
            backend: address.parse().unwrap(),
            named: true,
            weight_before: Some(100.0),
            weight: Some(0.0),
            control_before: Some(Control::Policy),
            control: Some(Control::Drained),
            slots_before: 32_636,
            slots: 0,
            moved_to: vec![SlotMove {
                backend: "198.18.0.12".parse().unwrap(),
                slots: 32_636,
            }],
            moved_from: vec![],
        }
    }

    fn vip(moved: usize) -> VipChange {
        VipChange {
            vip: "198.18.1.1:80/tcp".into(),
            change: VipChangeKind::Changed,
            size: 65_537,
            slots_moved: moved,
        }
    }

    #[test]
    fn a_drain_says_what_moved_where() {
        let change = Change {
            action: "drained".into(),
            changed: true,
            note: None,
            backends: vec![backend("198.18.0.11")],
            vips: vec![vip(32_636)],
        };
        assert_eq!(
            lines(&change),
            vec![
                "backend 198.18.0.11 (VIP 198.18.1.1:80/tcp): weight 100 → 0 (drained: no new \
                 flows, established ones continue), 32,636 slots moved to 198.18.0.12"
            ]
        );
    }

    #[test]
    fn moves_among_other_backends_get_a_line_of_the_vip() {
        let mut b = backend("198.18.0.11");
        b.moved_to = ["198.18.0.12", "198.18.0.13", "198.18.0.14", "198.18.0.15"]
            .iter()
            .map(|a| SlotMove {
                backend: a.parse().unwrap(),
                slots: 4,
            })
            .collect();
        let change = Change {
            action: "drained".into(),
            changed: true,
            note: None,
            backends: vec![b],
            vips: vec![vip(20)],
        };
        let text = lines(&change);
        assert!(
            text[0].ends_with(
                "16 slots moved to 198.18.0.12 (4), 198.18.0.13 (4), 198.18.0.14 (4) and \
                 1 other (4)"
            ),
            "{text:?}"
        );
        assert_eq!(
            text[1],
            "VIP 198.18.1.1:80/tcp: 20 of 65,537 slots moved in all (0.0 %)"
        );
    }

    #[test]
    fn asking_again_changes_nothing_and_says_so() {
        let mut b = backend("198.18.0.11");
        b.moved_to.clear();
        let change = Change {
            action: "drained".into(),
            changed: false,
            note: Some("already drained".into()),
            backends: vec![b],
            vips: vec![],
        };
        assert_eq!(
            lines(&change),
            vec!["backend 198.18.0.11 (VIP 198.18.1.1:80/tcp): already drained; nothing changed"]
        );
        let reload = Change {
            action: "configuration reloaded from lb.toml".into(),
            changed: false,
            ..Change::default()
        };
        assert_eq!(
            lines(&reload),
            vec!["configuration reloaded from lb.toml: nothing changed"]
        );
    }

    #[test]
    fn a_reload_says_the_action_then_each_change() {
        let mut b = backend("198.18.0.13");
        b.named = false;
        b.weight_before = None;
        b.weight = Some(1.0);
        b.control_before = None;
        b.control = Some(Control::Policy);
        b.moved_from = std::mem::take(&mut b.moved_to);
        let change = Change {
            action: "configuration reloaded from lb.toml".into(),
            changed: true,
            note: None,
            backends: vec![b],
            vips: vec![vip(32_636)],
        };
        assert_eq!(
            lines(&change),
            vec![
                "configuration reloaded from lb.toml",
                "  backend 198.18.0.13 (VIP 198.18.1.1:80/tcp): weight – → 1 (added), 32,636 \
                 slots moved from 198.18.0.12",
            ]
        );
    }
}
