"""Perplexity through the engine already loaded: the same numbers as the definition computed from
a logits_all model, and no second model."""

from __future__ import annotations

import numpy as np
import pytest

from cmc_edge.combine import log_softmax_np, mapped_shift_np
from cmc_edge.eval.runner import perplexity
from cmc_edge.runtime.engine import Delta, Engine
from cmc_edge.runtime.target import TargetLLM

TEXT = ("The capital of Italy is Rome, and the capital of Spain is Madrid. A tiny delta model "
        "steers a large one.")


def reference_perplexity(model_path, text, delta=None, alpha=0.0, *, n_ctx=256, max_tokens=400):
    """The definition, the long way: every position's logits from a logits_all model, plus the
    reference shift (mapped_shift_np) of a delta that read the first token and the text after it."""
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=n_ctx, n_threads=1, verbose=False, logits_all=True)
    target = TargetLLM(model_path, n_ctx=16, n_threads=1)            # for its tokenizer and pieces
    toks = target.tokenize(text)[:max_tokens]
    llm.eval(toks)
    scores = np.array(llm.scores[: len(toks)], dtype=np.float32)     # (N, V)
    first = 1 if target.piece(toks[0]) == b"" else 0
    tracker = delta.tracker(target.piece(toks[first]).decode()) if delta is not None and alpha else None
    nll, seen = [], b""
    for i in range(first + 1, len(toks)):
        row = scores[i - 1].copy()
        if tracker is not None:
            row += mapped_shift_np(delta.head.logits(tracker.state_for(seen)), delta.map.index, delta.map.mask, alpha)
        nll.append(-log_softmax_np(row)[toks[i]])
        seen += target.piece(toks[i])
    llm.close()
    return float(np.exp(np.mean(nll)))


@pytest.fixture()
def engine(tiny_gguf, tmp_path):
    from tiny_checkpoint import make_tiny_bundle

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    eng = Engine(target, [Delta(make_tiny_bundle(tmp_path / "bundle"), target, variant="fp32")])
    yield eng
    eng.close()


def test_perplexity_scores_through_the_loaded_model_and_matches_the_definition(engine, tiny_gguf, monkeypatch):
    import llama_cpp

    delta = engine.deltas[0]
    want = {a: reference_perplexity(tiny_gguf, TEXT, delta, a) for a in (0.0, 1.5)}
    loads = []
    real_init = llama_cpp.Llama.__init__

    def counting_init(self, *args, **kw):
        loads.append(kw.get("logits_all"))
        real_init(self, *args, **kw)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", counting_init)
    got = {a: perplexity(engine, TEXT, alphas=[a]) for a in (0.0, 1.5)}
    assert loads == []                                          # no second model, no n_ctx x V buffer
    for a in want:
        assert got[a] == pytest.approx(want[a], rel=1e-4)
    assert got[1.5] != pytest.approx(got[0.0], rel=1e-3)        # the delta does change the scores
    assert perplexity(engine, TEXT, alphas=[1.5], max_tokens=20) == pytest.approx(
        reference_perplexity(tiny_gguf, TEXT, delta, 1.5, max_tokens=20), rel=1e-4)


def test_eval_logits_gives_every_position_in_any_chunking(tiny_gguf):
    from llama_cpp import Llama

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    toks = target.tokenize(TEXT)
    ref = Llama(str(tiny_gguf), n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    ref.eval(toks)
    want = np.array(ref.scores[: len(toks)], dtype=np.float32)      # (N, V)
    for chunk in (1, 7, 64):
        target.llm.reset()
        target.llm.eval(toks[:3])
        first = target.last_logits()
        rows = np.stack(list(target.eval_logits(toks[3:], chunk=chunk)))
        # Batch shapes round differently (AVX-512 kernels: up to ~0.01 on logits of size ~10); a row
        # off by one position would differ by whole units.
        np.testing.assert_allclose(first, want[2], rtol=2e-3, atol=2e-2)
        np.testing.assert_allclose(rows, want[3:], rtol=2e-3, atol=2e-2)
        assert np.abs(rows[1:] - want[3:-1]).max() > 1.0          # the tolerance does tell positions apart
        assert target.llm.n_tokens == len(toks)


def test_the_engine_generates_as_before_after_scoring_a_text(engine):
    from cmc_edge.runtime.engine import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0)
    before = engine.generate("The capital of France", params).read()
    perplexity(engine, TEXT)
    assert engine.generate("The capital of France", params).read() == before


def test_a_text_too_short_to_score_is_refused(engine):
    from cmc_edge.errors import InputError

    with pytest.raises(InputError, match="fewer than two tokens"):
        perplexity(engine, "a")
