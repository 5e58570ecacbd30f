//! The floor stage: every free backend keeps a minimum share of the scale
//! ([`Params::floor_share`](super::Params::floor_share)), at most a fifth of an equal
//! share, so that it is still observed and can win traffic back.

use super::{Note, Params, Update};

/// The floor as a share of the scale with `free_count` free backends.
pub(super) fn share(params: &Params, free_count: usize) -> f64 {
    params.floor_share.min(0.2 / free_count.max(1) as f64)
}

/// Raises every free backend's proposal to the floor.
pub(super) fn raise(u: &mut Update) {
    let free_count = u.free.iter().filter(|&&f| f).count();
    let floor = share(u.params, free_count) * u.params.scale as f64;
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        if u.proposal[k] < floor {
            u.proposal[k] = floor;
            u.notes[k].push(Note::Floor { floor });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Input, PolicyKind, State, pool};
    use super::*;

    #[test]
    fn the_floor_raises_the_low_and_is_at_most_a_fifth_of_an_equal_share() {
        let p = Params {
            floor_share: 0.1,
            ..Params::default()
        };
        let inputs = vec![
            Input {
                healthy: true,
                configured_weight: 1,
                ..Input::default()
            };
            4
        ];
        let mut u = pool::begin(PolicyKind::Ai, &p, &State::default(), &inputs);
        u.proposal = vec![10.0, 4000.0, 3000.0, 2990.0];
        raise(&mut u);
        // A fifth of an equal share of four is 5 %, below the 10 % asked for.
        assert_eq!(u.proposal, vec![500.0, 4000.0, 3000.0, 2990.0]);
        assert_eq!(u.notes[0], vec![Note::Floor { floor: 500.0 }]);
        assert!(u.notes[1].is_empty());
    }
}
