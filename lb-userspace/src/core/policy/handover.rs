//! The hand-over stage: what the shed backends give up goes at once, first to the
//! free backends that are not strained and have room for it (below both their shown
//! capacity and their filtered target), in proportion to that room; what is left
//! beyond that room to the backends below the strain line, by their spare. A backend
//! that takes some makes its whole step at once, outside the budget, and its filter
//! starts again. Spread over everyone by weight instead, the share lands on backends
//! that are themselves at their limit (with capacities 1, 2 and 4 under equal
//! weights at 90 % load, the 2× backends), whose queues then grow while the budget
//! lets them down slowly.

use super::capacity::{STRAINED, strained};
use super::filter::Filtered;
use super::{Note, State, Update};

/// What each backend has room for, in the pool's units: what it is given below both
/// its shown capacity (one interval's figure) and its filtered target (which one
/// noisy interval does not move far): a backend given room from a lucky interval
/// alone would be the next to be shed. 0 for strained and shed backends.
pub(super) fn room(u: &Update, shown_in_pool: &[f64], filtered_in_pool: &[f64]) -> Vec<f64> {
    (0..u.n())
        .map(|k| {
            if u.free[k] && !u.shed[k] && !strained(u.params, &u.inputs[k]) {
                (shown_in_pool[k].min(filtered_in_pool[k]) - u.proposal[k]).max(0.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// The free backends below the strain line: the only ones with spare.
pub(super) struct Takers<'e> {
    list: Vec<usize>,
    /// What the free backends served, requests per second: converts a shown
    /// capacity into the pool's units.
    served: f64,
    shown_rps: &'e [Option<f64>],
}

impl<'e> Takers<'e> {
    pub(super) fn of(u: &Update, shown_rps: &'e [Option<f64>]) -> Takers<'e> {
        let served: f64 = u
            .free()
            .filter_map(|k| u.inputs[k].qps.filter(|q| q.is_finite() && *q > 0.0))
            .sum();
        let list = u
            .free()
            .filter(|&k| !u.shed[k] && !strained(u.params, &u.inputs[k]))
            .collect();
        Takers {
            list,
            served,
            shown_rps,
        }
    }

    /// What backend `k`'s shown capacity carries below the strain line beyond what
    /// it is proposed, in the pool's units.
    fn spare_of(&self, u: &Update, k: usize) -> f64 {
        match self.shown_rps[k] {
            Some(c) if self.served > 0.0 => {
                (STRAINED * c * u.pool / self.served - u.proposal[k]).max(0.0)
            }
            _ => 0.0,
        }
    }

    /// The takers' spare, all told.
    pub(super) fn spare_total(&self, u: &Update) -> f64 {
        self.list.iter().map(|&k| self.spare_of(u, k)).sum()
    }
}

/// Hands what the shed backends gave up to the backends with room, then beyond
/// that room to the takers by their spare (by what they are given where none has
/// any; evenly where they are given nothing).
pub(super) fn give(u: &mut Update, state: &mut State, room: &[f64], takers: &Takers) {
    let n = u.n();
    let total_room: f64 = room.iter().sum();
    let freed: f64 = (0..n)
        .filter(|&k| u.shed[k])
        .map(|k| (u.start[k] as f64 - u.proposal[k]).max(0.0))
        .sum();
    let given = if total_room > 0.0 {
        freed.min(total_room)
    } else {
        0.0
    };
    let mut within_room = vec![0.0; n];
    if given > 0.0 {
        for k in (0..n).filter(|&k| room[k] > 0.0) {
            within_room[k] = given * room[k] / total_room;
            u.proposal[k] += within_room[k];
        }
    }
    let left = freed - given;
    let mut beyond_room = vec![0.0; n];
    if left > 0.0 && !takers.list.is_empty() {
        let spare: Vec<f64> = takers.list.iter().map(|&k| takers.spare_of(u, k)).collect();
        let by_spare: f64 = spare.iter().sum();
        let by_weight: f64 = takers.list.iter().map(|&k| u.proposal[k]).sum();
        for (j, &k) in takers.list.iter().enumerate() {
            beyond_room[k] = if by_spare > 0.0 {
                left * spare[j] / by_spare
            } else if by_weight > 0.0 {
                left * u.proposal[k] / by_weight
            } else {
                left / takers.list.len() as f64
            };
            u.proposal[k] += beyond_room[k];
        }
    }
    for k in (0..n).filter(|&k| within_room[k] > 0.0 || beyond_room[k] > 0.0) {
        u.relieving[k] = true;
        state.targets.insert(
            u.inputs[k].id,
            Filtered::at(u.proposal[k] / u.pool.max(1.0)),
        );
        if within_room[k] > 0.0 {
            u.notes[k].push(Note::TookWithinRoom {
                weight: within_room[k],
            });
        }
        if beyond_room[k] > 0.0 {
            u.notes[k].push(Note::TookBeyondRoom {
                weight: beyond_room[k],
            });
        }
    }
}

/// A shed backend gets its cut as a share of all the weight, whatever the others'
/// filtered steps make of the total (with every other backend strained, what it
/// gives up goes to them in proportion to what they get; the next update's rescale
/// restores the total).
pub(super) fn settle_shed_shares(u: &mut Update) {
    let n = u.n();
    if !u.shed.iter().any(|&x| x) {
        return;
    }
    let held: f64 = (0..n)
        .filter(|&k| !u.free[k])
        .map(|k| u.after[k] as f64)
        .sum();
    let now = u.pool + held;
    let shed_share: f64 = (0..n)
        .filter(|&k| u.shed[k])
        .map(|k| u.proposal[k] / now)
        .sum();
    let others: f64 = held
        + (0..n)
            .filter(|&k| u.free[k] && !u.shed[k])
            .map(|k| u.proposal[k])
            .sum::<f64>();
    if shed_share < 1.0 && others > 0.0 {
        for k in (0..n).filter(|&k| u.shed[k]) {
            u.proposal[k] = u.proposal[k] / now * others / (1.0 - shed_share);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Input, Params, PolicyKind, State, pool};
    use super::*;

    /// Three free backends at 1,000 / 1,000 / 1,000 of a 3,000 pool: the first shed
    /// to 400 (giving up 600); the second has room for 200 below its capacity and
    /// target, the third is strained.
    fn world() -> Vec<Input> {
        let mut inputs = vec![
            Input {
                healthy: true,
                configured_weight: 1,
                qps: Some(100.0),
                utilisation: Some(0.5),
                ..Input::default()
            };
            3
        ];
        inputs[2].utilisation = Some(0.95);
        inputs
    }

    #[test]
    fn what_a_shed_gives_up_goes_to_room_first_then_by_spare_never_to_the_strained() {
        let p = Params {
            scale: 3000,
            ..Params::default()
        };
        let inputs = world();
        let mut state = State::default();
        let mut u = pool::begin(PolicyKind::Reactive, &p, &state, &inputs);
        u.shed[0] = true;
        u.proposal = vec![400.0, 1000.0, 1000.0];
        let room = room(&u, &[0.0, 1200.0, 1500.0], &[0.0, 1300.0, 1500.0]);
        assert_eq!(room, vec![0.0, 200.0, 0.0], "no room for shed or strained");
        let shown = [Some(200.0), Some(200.0), Some(105.0)];
        let takers = Takers::of(&u, &shown);
        give(&mut u, &mut state, &room, &takers);
        // 200 within its room, and the other 400 to it too: the only taker.
        assert!((u.proposal[1] - 1600.0).abs() < 1e-9, "{:?}", u.proposal);
        assert_eq!(u.proposal[2], 1000.0, "a strained backend took some");
        assert!(u.relieving[1] && !u.relieving[2]);
        assert!(matches!(u.notes[1][0], Note::TookWithinRoom { .. }));
        assert!(matches!(u.notes[1][1], Note::TookBeyondRoom { .. }));
        assert!(
            state.targets.contains_key(&inputs[1].id),
            "its filter restarts"
        );
    }
}
