//! The quantize stage: the free backends' proposals become whole multiples of the
//! quantum (fewer, larger table updates), and a VIP never ends up without weight
//! while a backend is healthy and free.

use super::{Note, Update};

/// Rounds every free backend's proposal to a whole, non-zero number of quanta.
pub(super) fn round(u: &mut Update) {
    let q = u.params.quantum.max(1) as f64;
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        u.after[k] = ((u.proposal[k] / q).round() * q).max(q) as u32;
    }
}

/// Gives the first healthy free backend one quantum if every weight is 0.
pub(super) fn keep_a_backend(u: &mut Update) {
    let inputs = u.inputs;
    if u.after.iter().all(|&w| w == 0)
        && let Some(k) = (0..inputs.len()).find(|&k| inputs[k].healthy && inputs[k].hold.is_none())
    {
        u.after[k] = u.params.quantum.max(1);
        u.notes[k].push(Note::KeptForTheVip);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Input, Params, PolicyKind, State, pool};
    use super::*;

    #[test]
    fn weights_are_whole_quanta_and_a_vip_keeps_a_backend() {
        let p = Params::default();
        let mut inputs = vec![
            Input {
                healthy: true,
                configured_weight: 1,
                ..Input::default()
            };
            3
        ];
        inputs[0].hold = Some(0);
        let mut u = pool::begin(PolicyKind::Ai, &p, &State::default(), &inputs);
        u.proposal = vec![0.0, 1234.0, 2.0];
        round(&mut u);
        assert_eq!(u.after, vec![0, 1230, 10], "never below one quantum");
        u.after = vec![0, 0, 0];
        keep_a_backend(&mut u);
        assert_eq!(
            u.after,
            vec![0, 10, 0],
            "the first free backend, not the held one"
        );
        assert_eq!(u.notes[1], vec![Note::KeptForTheVip]);
    }
}
