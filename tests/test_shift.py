"""The runtime's shift: full path against the reference, and the top-k path exact against the full one."""

import numpy as np
import pytest

from cmc_edge.combine import combine_np, log_softmax_np, mapped_shift_np
from cmc_edge.runtime.shift import DeltaHead, MappedHead, add_shift_, group_rows, sampler_top_k, shifted_argmax


def random_head(rng, v=300, d=16, scale=0.3, grouped=False):
    E = rng.normal(size=(v, d)).astype(np.float32) * scale
    return DeltaHead(E, group_rows(E, n_groups=max(1, v // 10), iters=3) if grouped else None)


def test_raw_logit_shift_gives_the_same_distribution_as_the_paper_rule():
    """Softmax is shift-invariant: the runtime may add the shift to raw logits (no log_softmax)."""
    rng = np.random.default_rng(1)
    head = random_head(rng, v=50)
    h = rng.normal(size=16).astype(np.float32)
    t = rng.normal(size=50).astype(np.float32) * 3
    m = MappedHead(head, np.arange(50), np.ones(50, bool))
    runtime = t.copy()
    add_shift_(runtime, [(m, h, 1.5)], k=None)
    np.testing.assert_allclose(log_softmax_np(runtime), log_softmax_np(combine_np(t, head.logits(h), 1.5)), atol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_full_shift_matches_the_reference(floor):
    rng = np.random.default_rng(2)
    head = random_head(rng, v=40)
    h = rng.normal(size=16).astype(np.float32)
    index = rng.integers(0, 40, size=70)
    mask = rng.random(70) < 0.8
    ref = mapped_shift_np(head.logits(h), np.where(mask, index, 0), mask, 0.7, floor=floor)
    got = np.zeros(70, np.float32)
    MappedHead(head, np.where(mask, index, 0), mask, floor=floor).shift_full(h, 0.7, got)
    assert np.all(got[~mask] == 0)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    unfloored = mapped_shift_np(head.logits(h), np.where(mask, index, 0), mask, 0.7)
    small = mask & (np.abs(unfloored) < floor)
    assert np.all(got[small] == 0) and np.all(got[~small] == unfloored[~small])
    assert small.any() == (floor > 0)      # the floor drops something here, and only a floor does


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_shift_at_matches_the_full_shift(floor):
    rng = np.random.default_rng(3)
    head = random_head(rng)
    m = MappedHead(head, rng.integers(0, 300, size=500), rng.random(500) < 0.9, floor=floor)
    h = rng.normal(size=16).astype(np.float32)
    full = np.zeros(500, np.float32)
    m.shift_full(h, -1.3, full)
    ids = rng.choice(500, size=60, replace=False)
    np.testing.assert_allclose(m.shift_at(h, -1.3, ids), full[ids], atol=1e-5)


def test_a_negative_or_infinite_floor_is_refused():
    from cmc_edge.errors import DeltaFault

    head = random_head(np.random.default_rng(0), v=10)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(DeltaFault, match="shift floor"):
            MappedHead(head, np.arange(10), np.ones(10, bool), floor=bad)


def top(scores, k):
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_whole_vocabulary_bound_and_per_token_ranges_hold_every_shift():
    rng = np.random.default_rng(6)
    for grouped, floor in ((False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)):
        head = random_head(rng, grouped=grouped)
        m = MappedHead(head, rng.integers(0, 300, size=500), rng.random(500) < 0.8, floor=floor)
        for alpha in (-1.5, 0.7):
            h = rng.normal(size=16).astype(np.float32) * 2
            full = np.zeros(500, np.float32)
            m.shift_full(h, alpha, full)
            bound = m.shift_bound(h, alpha)
            assert np.all(np.abs(full) <= bound) and bound < 10 * np.abs(full).max()
            assert (full[m.mask] == 0).any() == (floor > 0)
            ids = rng.choice(500, size=80)
            lo, hi = m.shift_range_at(h, alpha, ids)
            glo, ghi = m.shift_range(h, alpha)
            np.testing.assert_allclose(lo, glo[m.tlabel[ids]], atol=1e-5)
            np.testing.assert_allclose(hi, ghi[m.tlabel[ids]], atol=1e-5)
            assert np.all(lo <= full[ids]) and np.all(full[ids] <= hi)
            assert np.all(lo[~m.mask[ids]] <= 0) and np.all(hi[~m.mask[ids]] >= 0)


@pytest.mark.parametrize("gather", [0, 2048])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_path_is_exact(k, gather, monkeypatch):
    """Over many random cases (flat and peaked target logits, one or two deltas, either sign of
    alpha, strong and weak deltas): the top k from the fast path equal the full computation's,
    ids and scores, and every other score is -inf. (gather 0: the pool's bounds from every
    group's range; 2048: from its own tokens' groups.)"""
    import cmc_edge.runtime.shift as shift_mod

    monkeypatch.setattr(shift_mod, "GATHER_POOL", gather)
    rng = np.random.default_rng(k)
    fast_taken = 0
    for case in range(150):
        v_t = int(rng.integers(k + 1, 2000))
        parts = []
        for _ in range(int(rng.integers(1, 3))):
            head = random_head(rng, v=int(rng.integers(50, 400)), scale=float(rng.choice([0.05, 0.3, 1.0])),
                               grouped=bool(rng.random() < 0.5))
            m = MappedHead(head, rng.integers(0, head.vocab_size, size=v_t), rng.random(v_t) < 0.85,
                           floor=float(rng.choice([0.0, 0.0, 0.2, 1.0])))
            parts.append((m, rng.normal(size=16).astype(np.float32) * float(rng.choice([0.5, 3.0])),
                          float(rng.choice([-1.0, 0.5, 1.0, 2.0]))))
        t = (rng.normal(size=v_t) * float(rng.choice([0.5, 3.0, 10.0]))).astype(np.float32)
        full, fast = t.copy(), t.copy()
        add_shift_(full, parts, k=None)
        took = add_shift_(fast, parts, k=k)
        fast_taken += took
        ids_full, s_full = top(full, k)
        ids_fast, s_fast = top(fast, k)
        np.testing.assert_allclose(s_fast, s_full, atol=1e-4, err_msg=f"case {case}")
        # the same winners, except that a tie at the k-th score may be broken either way
        differ = np.setxor1d(ids_fast, ids_full)
        assert np.all(np.abs(full[differ] - s_full[-1]) <= 1e-4), f"case {case}: winners {differ} differ"
        if took:
            finite = np.isfinite(fast)
            assert finite.sum() >= k and np.all(np.isneginf(fast[~finite]))
            np.testing.assert_allclose(fast[finite], full[finite], atol=1e-4)
    assert fast_taken > 100          # the fast path is the common case, not a curiosity


def test_groups_bound_every_row_and_are_tighter_than_cauchy_schwarz():
    rng = np.random.default_rng(5)
    E = (rng.normal(size=(2000, 16)) + rng.normal(size=(20, 16)).repeat(100, 0) * 3).astype(np.float32)  # clustered
    plain, grouped = DeltaHead(E), DeltaHead(E, group_rows(E, n_groups=40))
    for _ in range(20):
        h = rng.normal(size=16).astype(np.float32)
        zc = E @ h - plain.mean_row @ h
        for head in (plain, grouped):
            lo, hi = head.centred_range(h)
            assert np.all(lo[head.labels] <= zc + 1e-4) and np.all(zc <= hi[head.labels] + 1e-4)
        width = lambda head: float(np.mean(np.subtract(*head.centred_range(h)[::-1])[head.labels]))  # noqa: E731
        assert width(grouped) < 0.5 * width(plain)


def test_too_many_candidates_falls_back_to_the_full_path():
    rng = np.random.default_rng(4)
    head = random_head(rng, scale=2.0)
    m = MappedHead(head, np.arange(300), np.ones(300, bool))
    h = rng.normal(size=16).astype(np.float32) * 3
    t = np.zeros(300, np.float32)                     # flat: every token is a candidate
    full, fast = t.copy(), t.copy()
    add_shift_(full, [(m, h, 1.0)], k=None)
    assert add_shift_(fast, [(m, h, 1.0)], k=40, max_candidates=100) is False
    np.testing.assert_array_equal(fast, full)


def test_sampler_top_k_rules():
    assert sampler_top_k(0.0, 40) == 1                # greedy reads only the maximum
    assert sampler_top_k(0.8, 40) == 40
    assert sampler_top_k(0.8, 0) is None              # no top-k cut: top-p needs the whole distribution
    assert sampler_top_k(0.0, 40, repeat_penalty=1.1) is None


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf, tmp_path_factory):
    from tiny_checkpoint import make_tiny_bundle

    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=512, n_threads=1)
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("shift") / "bundle")
    return Engine(target, [Delta(bundle, target, alpha=1.0), Delta(bundle, target, alpha=1.0, name="second")])


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, top_k=5, seed=3),
                                    dict(temperature=0.7, top_k=40, top_p=0.9, seed=11)])
def test_engine_top_k_path_generates_exactly_what_the_full_path_does(tiny_engine, monkeypatch, params):
    """Two deltas on the tiny GGUF (another vocabulary, PM-MinED map), strong alphas: the per-step
    proof lets the loop skip most of the output layer, and the tokens are the same as with the
    whole vocabulary shifted."""
    import cmc_edge.runtime.engine as engine_mod
    from cmc_edge.runtime.engine import SamplingParams

    p = SamplingParams(max_tokens=40, **params)
    prompt = "<|im_start|>user\nThe capital of France<|im_end|>\n<|im_start|>assistant\n"
    for alphas in ([3.0, -2.0], [1.0, 0.5]):
        fast = tiny_engine.generate(prompt, p, alphas=alphas)
        fast.read()
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "sampler_top_k", lambda *a, **kw: None)
            full = tiny_engine.generate(prompt, p, alphas=alphas)
            full.read()
        off = tiny_engine.generate(prompt, p, alphas=[0.0, 0.0])
        off.read()
        assert fast.tokens == full.tokens
        assert full.full_shift_steps == len(full.tokens) + (full.finish_reason == "stop")
        assert fast.full_shift_steps < full.full_shift_steps
    assert fast.tokens != off.tokens or full.tokens != off.tokens      # the deltas do change the output


def test_shifted_argmax_is_the_greedy_token_of_the_full_shift():
    """Random cases as above: the candidate-only argmax is the first maximum (lowest id, as
    llama.cpp's greedy sampler picks) of the fully shifted scores, and leaves the logits unwritten."""
    rng = np.random.default_rng(9)
    found = 0
    for case in range(150):
        v_t = int(rng.integers(2, 2000))
        head = random_head(rng, v=int(rng.integers(50, 400)), scale=float(rng.choice([0.05, 0.3, 1.0])),
                           grouped=bool(rng.random() < 0.5))
        m = MappedHead(head, rng.integers(0, head.vocab_size, size=v_t), rng.random(v_t) < 0.85,
                       floor=float(rng.choice([0.0, 0.0, 0.2, 1.0])))
        parts = [(m, rng.normal(size=16).astype(np.float32) * float(rng.choice([0.5, 3.0])),
                  float(rng.choice([-1.0, 1.0, 2.0])))]
        t = (rng.normal(size=v_t) * float(rng.choice([0.5, 3.0, 10.0]))).astype(np.float32)
        full, before = t.copy(), t.copy()
        add_shift_(full, parts, k=None)
        got = shifted_argmax(t, parts)
        np.testing.assert_array_equal(t, before)
        if got is not None:
            found += 1
            assert full[got] >= full.max() - 1e-4, f"case {case}"
    assert found > 100


def test_shifted_argmax_breaks_ties_to_the_lowest_id():
    E = np.array([[1., 0.], [0., 1.], [-1., 0.], [0., -1.]], np.float32)
    m = MappedHead(DeltaHead(E), index=np.array([1, 3, 1, 1]), mask=np.array([True, True, True, False]))
    h = np.array([0., 2.], np.float32)                   # centred z = [0, 2, 0, -2]: shifts +2, -2, +2, 0
    for t, want in (([0., 5., 3., 5.], 2),               # combined [2, 3, 5, 5]
                    ([3., 5., 3., 5.], 0)):              # combined [5, 3, 5, 5]
        t = np.array(t, np.float32)
        full = t.copy()
        add_shift_(full, [(m, h, 1.0)], k=None)
        assert int(np.argmax(full)) == want              # numpy's argmax: the first maximum
        assert shifted_argmax(t, [(m, h, 1.0)]) == want
