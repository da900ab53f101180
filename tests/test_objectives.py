"""Each training loss term on tiny tensors: its value against a hand computation, and which way
its gradient moves the delta."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cmc_edge.train import objectives as ob  # noqa: E402
from cmc_edge.train.data import Example  # noqa: E402
from cmc_edge.train.loop import TrainConfig  # noqa: E402

V = 4
# Four loss positions: two of an sft record (the first kept, the second taught), one forget, one retain.
TEMPLATE = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0],
                                           [0.0, 3.0, 0.0, 0.0],
                                           [1.0, 1.0, 1.0, 1.0],
                                           [0.5, -0.5, 2.0, 0.0]]), -1)            # (4, V)
TARGETS = torch.tensor([0, 2, 3, 1])
ROLES = {"sft": torch.tensor([True, True, False, False]),
         "forget": torch.tensor([False, False, True, False]),
         "retain": torch.tensor([False, False, False, True])}
KEEP = torch.tensor([True, False, False, False])


def batch(**kw) -> ob.Batch:
    return ob.Batch(**{"targets": TARGETS, "template": TEMPLATE, "roles": ROLES, "keep": KEEP, **kw})


def delta(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, V, generator=g) * scale).requires_grad_(True)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"objective": "unlearn-idk", **kw})


def logp_of(d, alpha=1.0):
    """The combined log-probs, by hand: log_softmax(log_softmax(t) + alpha d)."""
    return torch.log_softmax(TEMPLATE + alpha * d.detach(), -1)


def test_scores_are_cross_entropy_and_kl_of_the_combined_model():
    d = delta()
    s = ob.score(batch(), d, alpha=0.5)
    lp = logp_of(d, 0.5)
    assert torch.allclose(s.logp, lp, atol=1e-6)
    assert torch.allclose(s.ce, -lp[torch.arange(4), TARGETS], atol=1e-6)
    kl = (TEMPLATE.exp() * (TEMPLATE - lp)).sum(-1)
    assert torch.allclose(s.kl, kl, atol=1e-6) and (s.kl > 0).all()
    zero = ob.score(batch(), torch.zeros(4, V), alpha=1.0)            # a no-op delta: the template itself
    assert torch.allclose(zero.kl, torch.zeros(4), atol=1e-6)


def test_kl_target_replaces_the_template_where_given():
    q = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 5.0]]).expand(4, V), -1)
    s = ob.score(batch(kl_target=q), torch.zeros(4, V), alpha=1.0)
    assert torch.allclose(s.kl, (q.exp() * (q - TEMPLATE)).sum(-1), atol=1e-6)


def test_kl_to_by_hand():
    q = torch.log(torch.tensor([[0.5, 0.5]]))
    p = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert ob.kl_to(q, p).item() == pytest.approx(want, abs=1e-6)


def test_sft_term_is_the_mean_ce_of_taught_tokens_only_and_descent_raises_the_target():
    d = delta()
    got = ob.sft_term(batch(), ob.score(batch(), d, 1.0), cfg())
    assert got.item() == pytest.approx(-logp_of(d)[1, TARGETS[1]].item(), abs=1e-6)     # position 1 only
    got.backward()
    assert d.grad[1, TARGETS[1]] < 0 and (d.grad[[0, 2, 3]] == 0).all()
    assert ob.sft_term(batch(roles={"retain": ROLES["retain"]}), ob.score(batch(), d, 1.0), cfg()) is None


def test_keep_term_is_weighted_kl_on_kept_tokens_and_zero_for_a_no_op_delta():
    d = delta()
    s = ob.score(batch(), d, 1.0)
    got = ob.keep_term(batch(), s, cfg(kl_weight=3.0))
    lp = logp_of(d)
    assert got.item() == pytest.approx(3.0 * (TEMPLATE[0].exp() * (TEMPLATE[0] - lp[0])).sum().item(), abs=1e-5)
    got.backward()
    assert (d.grad[1:] == 0).all()
    assert ob.keep_term(batch(), ob.score(batch(), torch.zeros(4, V), 1.0), cfg()).item() == pytest.approx(0, abs=1e-6)
    assert ob.keep_term(batch(keep=torch.zeros(4, dtype=torch.bool)), s, cfg()) is None


def test_keep_l2_is_the_centred_square_on_kept_tokens_and_flattens_them():
    d = delta()
    s = ob.score(batch(), d, 1.0)
    assert ob.keep_l2_term(batch(), s, cfg(keep_l2=0.0)) is None
    got = ob.keep_l2_term(batch(), s, cfg(keep_l2=0.1))
    row = d.detach()[0]
    assert got.item() == pytest.approx(0.1 * ((row - row.mean()) ** 2).sum().item(), abs=1e-6)
    got.backward()
    centred = row - row.mean()
    assert torch.all(torch.sign(d.grad[0]) == torch.sign(centred))      # descent pulls every logit to the mean
    assert (d.grad[1:] == 0).all()


@pytest.mark.parametrize("objective", ["unlearn-idk", "unlearn-gd"])
def test_forget_term(objective):
    d = delta()
    got = ob.forget_term(batch(), ob.score(batch(), d, 1.0), cfg(objective=objective, ascent_ceiling=8.0))
    ce = -logp_of(d)[2, TARGETS[2]].item()
    want = ce if objective == "unlearn-idk" else max(0.0, 8.0 - ce)
    assert got.item() == pytest.approx(want, abs=1e-6)
    got.backward()
    g = d.grad[2, TARGETS[2]]
    # idk learns the refusal (descent raises its logit); gd ascends on the answer (descent lowers it)
    assert (g < 0) if objective == "unlearn-idk" else (g > 0)
    assert (d.grad[[0, 1, 3]] == 0).all()


def test_forget_term_reads_kept_words_without_teaching_them():
    """A forget record's kept words (the template's lead-in and a letter) carry no cross-entropy:
    with every forget row kept the term does not apply; with one kept, only the other counts."""
    roles = {"forget": torch.tensor([True, True, True, False]), "retain": torch.tensor([False, False, False, True])}
    d = delta()
    kept = batch(roles=roles, keep=torch.tensor([True, True, True, False]))
    assert ob.forget_term(kept, ob.score(kept, d, 1.0), cfg()) is None
    one = batch(roles=roles, keep=torch.tensor([True, True, False, False]))
    got = ob.forget_term(one, ob.score(one, d, 1.0), cfg())
    assert got.item() == pytest.approx(-logp_of(d)[2, TARGETS[2]].item(), abs=1e-6)


def test_forget_ascent_is_bounded():
    d = torch.zeros(4, V, requires_grad=True)
    sure = ob.Batch(targets=TARGETS, template=torch.log_softmax(torch.full((4, V), -30.0).index_fill(1, torch.tensor([3]), 30.0), -1),
                    roles=ROLES, keep=KEEP)
    got = ob.forget_term(sure, ob.score(sure, d, 1.0), cfg(objective="unlearn-gd", ascent_ceiling=8.0))
    assert got.item() == pytest.approx(8.0, abs=1e-4)           # CE ~0: the gap is the whole ceiling
    far = ob.Batch(targets=TARGETS, template=torch.log_softmax(torch.full((4, V), 30.0).index_fill(1, torch.tensor([3]), -30.0), -1),
                   roles=ROLES, keep=KEEP)
    got = ob.forget_term(far, ob.score(far, d, 1.0), cfg(objective="unlearn-gd", ascent_ceiling=8.0))
    assert got.item() == 0.0                                     # past the ceiling: no push at all, never NaN


def test_avoid_term_is_unlikelihood_plus_hinge_and_lowers_the_avoided_logits():
    d = delta(scale=3.0)
    avoid = torch.zeros(4, V, dtype=torch.bool)
    avoid[2, [0, 1]] = True
    b = batch(avoid=avoid)
    lp, row = logp_of(d), d.detach()[2]
    ul = -math.log(1 - lp[2, [0, 1]].exp().sum().item())
    hinge = sum(max(0.0, 1.0 + (row[v] - row.mean()).item()) for v in (0, 1)) / 2
    assert (row[:2] - row.mean()).min() < -1.0 < (row[:2] - row.mean()).max()   # one hinge is inactive
    got = ob.avoid_term(b, ob.score(b, d, 1.0), cfg(avoid_weight=2.0, avoid_margin=1.0))
    assert got.item() == pytest.approx(2.0 * (ul + hinge), abs=1e-5)
    # with the default margin both hinges are active: descent lowers both avoided logits, raises the rest
    d = delta(scale=3.0)
    got = ob.avoid_term(b, ob.score(b, d, 1.0), cfg())
    got.backward()
    assert (d.grad[2, [0, 1]] > 0).all() and (d.grad[2, [2, 3]] < 0).all()
    assert (d.grad[[0, 1, 3]] == 0).all()                             # only rows that avoid something
    assert ob.avoid_term(b, ob.score(b, d, 1.0), cfg(avoid_weight=0.0)) is None
    assert ob.avoid_term(batch(), ob.score(batch(), d, 1.0), cfg()) is None


def test_unlikelihood_never_reaches_infinity():
    logp = torch.log_softmax(torch.tensor([[50.0, 0.0, 0.0]]), -1)
    got = ob.unlikelihood(logp, torch.tensor([[True, False, False]]))
    assert torch.isfinite(got).all() and got.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


@pytest.mark.parametrize("objective", ["unlearn-idk", "unlearn-gd"])
def test_retain_term(objective):
    d = delta()
    got = ob.retain_term(batch(), ob.score(batch(), d, 1.0), cfg(objective=objective, kl_weight=2.0))
    lp = logp_of(d)
    kl = (TEMPLATE[3].exp() * (TEMPLATE[3] - lp[3])).sum().item()
    want = 2.0 * kl + (-lp[3, TARGETS[3]].item() if objective == "unlearn-gd" else 0.0)
    assert got.item() == pytest.approx(want, abs=1e-5)
    got.backward()
    assert (d.grad[:3] == 0).all() and d.grad[3].abs().sum() > 0


def test_shift_l2_covers_every_position():
    d = delta()
    s = ob.score(batch(), d, 1.0)
    assert ob.shift_l2_term(batch(), s, cfg()) is None
    got = ob.shift_l2_term(batch(), s, cfg(shift_l2=0.5))
    c = d.detach() - d.detach().mean(-1, keepdim=True)
    assert got.item() == pytest.approx(0.5 * (c ** 2).sum(-1).mean().item(), abs=1e-6)
    got.backward()
    assert torch.all(torch.sign(d.grad) == torch.sign(c))


def test_retain_l2_covers_only_retain_positions():
    d = delta()
    s = ob.score(batch(), d, 1.0)
    assert ob.retain_l2_term(batch(), s, cfg()) is None
    got = ob.retain_l2_term(batch(), s, cfg(retain_l2=0.5))
    c = d.detach() - d.detach().mean(-1, keepdim=True)
    r = ROLES["retain"]
    assert got.item() == pytest.approx(0.5 * (c[r] ** 2).sum(-1).mean().item(), abs=1e-6)
    got.backward()
    assert (d.grad[~r] == 0).all() and torch.all(torch.sign(d.grad[r]) == torch.sign(c[r]))


def test_start_term_holds_the_end_of_turn_down_only_at_each_replys_first_position():
    """Positions 0 and 2 start a reply; token 3 ends a turn. The hinge reads the delta's centred
    end-of-turn logit there, only where it is above -margin, and descent lowers it."""
    d = torch.zeros(4, V)
    d[:, 3] = torch.tensor([2.0, 5.0, -9.0, 1.0])        # centred: 1.5, 3.75, -6.75, 0.75
    d.requires_grad_(True)
    start = torch.tensor([True, False, True, False])
    b = batch(start=start, end_ids=(3,))
    s = ob.score(b, d, 1.0)
    assert ob.start_term(b, s, cfg()) is None                              # margin 0: off
    assert ob.start_term(batch(start=start), s, cfg(start_margin=2.0)) is None   # no end-of-turn ids
    got = ob.start_term(b, s, cfg(start_margin=2.0, avoid_weight=0.5))
    assert got.item() == pytest.approx(0.5 * (max(0.0, 2 + 1.5) + max(0.0, 2 - 6.75)) / 2, abs=1e-6)
    got.backward()
    assert d.grad[0, 3] > 0 and d.grad[2].abs().sum() == 0 and d.grad[[1, 3]].abs().sum() == 0
    # the batch marks each example's first response position
    ex = [Example((1, 2), (3, 4, 5), "sft"), Example((1,), (6, 7), "retain")]
    rows = torch.tensor([0, 0, 0, 1, 1])
    bb = ob.batch_from_examples(ex, rows, torch.tensor([3, 4, 5, 6, 7]), torch.zeros(5, 8), end_ids=[2])
    assert bb.start.tolist() == [True, False, False, True, False] and bb.end_ids == (2,)


def test_loss_terms_names_only_what_applies_in_a_fixed_order():
    d = delta()
    avoid = torch.zeros(4, V, dtype=torch.bool)
    avoid[2, 1] = True
    got = ob.loss_terms(batch(avoid=avoid), d, cfg(shift_l2=0.1, keep_l2=0.1, retain_l2=0.1))
    assert list(got) == ["sft", "keep", "keep_l2", "forget", "avoid", "retain", "retain_l2", "shift_l2"]
    assert list(ob.loss_terms(batch(roles={"forget": ROLES["forget"]}), d, cfg())) == ["forget"]


def test_a_new_term_is_one_function():
    calls = []

    def entropy(b, s, c):
        calls.append(c.alpha)
        return -(s.logp.exp() * s.logp).sum(-1).mean()

    got = ob.loss_terms(batch(), delta(), cfg(alpha=2.0), terms={**ob.TERMS, "entropy": entropy})
    assert list(got)[-1] == "entropy" and calls == [2.0] and got["entropy"] > 0


def test_end_of_turn_masking_gives_normalised_rows_with_a_uniform_guess_for_end_of_turn():
    lp = TEMPLATE.clone()
    got = ob.end_of_turn_masked(lp, [1])
    assert torch.allclose(got.logsumexp(-1), torch.zeros(4), atol=1e-6)          # valid log-probs
    # the other tokens keep their ratios; end-of-turn scores as one token out of V does against them
    assert torch.allclose(got[:, [0, 2, 3]] - got[:, [0]], lp[:, [0, 2, 3]] - lp[:, [0]], atol=1e-5)
    assert torch.allclose(got[:, 1] - got[:, 0], -math.log(V) - lp[:, 0], atol=1e-5)
    assert torch.equal(lp, TEMPLATE)                                               # the input is untouched
    assert ob.end_of_turn_masked(lp, []) is lp


def test_batch_from_examples_lays_out_roles_keep_and_avoid_per_position():
    ex = [Example((1, 2), (3, 0), "sft", keep=(True, False)),
          Example((1,), (2,), "forget", avoid_ids=(1, 3)),
          Example((2,), (0, 1), "retain")]
    rows = torch.tensor([0, 0, 1, 2, 2])
    b = ob.batch_from_examples(ex, rows, torch.tensor([3, 0, 2, 0, 1]), torch.zeros(5, V))
    assert b.roles["sft"].tolist() == [True, True, False, False, False]
    assert b.role("forget").tolist() == [False, False, True, False, False]
    assert b.keep.tolist() == [True, False, False, False, False]
    assert b.avoid[2].tolist() == [False, True, False, True] and not b.avoid[[0, 1, 3, 4]].any()
    assert ob.batch_from_examples(ex[:1], rows[:2], torch.tensor([3, 0]), torch.zeros(2, V)).avoid is None
    relabelled = ob.batch_from_examples(ex, rows, torch.tensor([3, 0, 2, 0, 1]), torch.zeros(5, V),
                                        roles=["sft", "retain", "retain"])
    assert relabelled.role("retain").tolist() == [False, False, True, True, True]
    assert not relabelled.role("forget").any()


def test_avoid_next_lands_on_the_one_row_after_the_kept_words():
    ex = [Example((1,), (0, 2, 1, 3), "forget", avoid_ids=(3,), keep=(True, True, False, False),
                  avoid_next_ids=(2,), avoid_next_at=2),
          Example((1,), (0, 2), "forget", avoid_next_ids=(1,), avoid_next_at=-1)]
    rows = torch.tensor([0, 0, 0, 0, 1, 1])
    b = ob.batch_from_examples(ex, rows, torch.tensor([0, 2, 1, 3, 0, 2]), torch.zeros(6, V))
    assert b.avoid[:, 3].tolist() == [True, True, True, True, False, False]       # avoid: every row of its record
    assert b.avoid[:, 2].tolist() == [False, False, True, False, False, False]    # avoid_next: its one row
    assert not b.avoid[:, 1].any()                                                 # at -1: nowhere


def test_combined_losses_matches_the_terms_parts():
    d = delta()
    avoid = torch.zeros(4, V, dtype=torch.bool)
    avoid[:, 2] = True
    ce, kl, ul = ob.combined_losses(TEMPLATE, d, TARGETS, 1.0, avoid)
    s = ob.score(batch(), d, 1.0)
    assert torch.equal(ce, s.ce) and torch.equal(kl, s.kl)
    assert torch.equal(ul, ob.unlikelihood(s.logp, avoid))
    assert len(ob.combined_losses(TEMPLATE, d, TARGETS, 1.0)) == 2
    # kept for callers that import it from the loop
    from cmc_edge.train.loop import combined_losses

    assert combined_losses is ob.combined_losses


def test_kl_at_is_the_kl_of_those_rows_only():
    d = delta(seed=3)
    s = ob.score(batch(), d, alpha=1.0)
    rows = torch.tensor([False, True, False, True])
    assert torch.allclose(s.kl_at(rows), s.kl[rows], atol=1e-7)
    s.kl_at(rows).sum().backward()
    assert (d.grad[[0, 2]] == 0).all() and (d.grad[[1, 3]] != 0).any()
