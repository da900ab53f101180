"""The decode loop without deltas equals plain llama-cpp-python; sampling flags are honoured."""

import pytest

from cmc_edge.errors import InputError
from cmc_edge.runtime.engine import Engine, SamplingParams, check_alpha
from cmc_edge.runtime.target import TargetLLM

PROMPT = "<|im_start|>user\nThe capital of France<|im_end|>\n<|im_start|>assistant\n"


def plain(path, prompt, **kw):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=1, verbose=False, seed=0)
    return llm.create_completion(prompt, **kw)["choices"][0]["text"]


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.8, 7), (1.2, 123)])
def test_no_delta_equals_plain_llama_cpp(tiny_gguf, temperature, seed):
    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    ours = eng.generate(PROMPT, SamplingParams(max_tokens=40, temperature=temperature, seed=seed)).read()
    theirs = plain(tiny_gguf, PROMPT, max_tokens=40, temperature=temperature, seed=seed)
    # llama-cpp-python drops invalid UTF-8 bytes; we show them as U+FFFD (the tiny model is random).
    assert ours.replace("\ufffd", "") == theirs


def test_seed_changes_samples_and_repeats(tiny_gguf):
    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    a = eng.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=1))
    b = eng.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=1))
    c = eng.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=2))
    a.read(), b.read(), c.read()
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_sequences_and_max_tokens(tiny_gguf):
    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    for seed in range(20):  # the tiny model is random: find a sample that runs to the limit
        full = eng.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=seed))
        text = full.read()
        if full.finish_reason == "length" and len(text.strip()) > 15 and "\ufffd" not in text[:16]:
            break
    assert full.finish_reason == "length" and len(full.tokens) == 30
    stop = text[10:13]
    cut = eng.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=seed, stop=(stop,)))
    assert cut.read() == text[: text.find(stop)]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("kw, problem", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"stop": ("",)}, "stop"),
])
def test_bad_sampling_params(kw, problem):
    with pytest.raises(InputError, match=problem):
        SamplingParams(**kw)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "x", None])
def test_alpha_must_be_finite(alpha):
    with pytest.raises(InputError, match="alpha"):
        check_alpha(alpha)


def test_prompt_longer_than_context_is_refused(tiny_gguf):
    eng = Engine(TargetLLM(tiny_gguf, n_ctx=64, n_threads=1))
    with pytest.raises(InputError, match="context"):
        eng.generate("word " * 200, SamplingParams(max_tokens=4))


def test_score_reply_at_alpha_zero_is_the_models_own_log_likelihood(tiny_gguf):
    """Teacher-forced NLL of a reply equals llama.cpp's own log-probs over prompt + reply (all logits)."""
    import numpy as np
    from llama_cpp import Llama

    from cmc_edge.combine import log_softmax_np

    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    msgs = [{"role": "user", "content": "The capital of France"}]
    reply = "Paris is the capital 123"
    ours = eng.score_reply(msgs, reply)
    prompt, _ = eng.chat_prompts(msgs)
    ptoks, rtoks = eng.target.tokenize(prompt), eng.target.tokenize(reply, add_bos=False)
    llm = Llama(str(tiny_gguf), n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    llm.eval(ptoks + rtoks)
    scores = np.array(llm.scores[: len(ptoks) + len(rtoks)])
    ref = [-log_softmax_np(scores[len(ptoks) - 1 + i])[t] for i, t in enumerate(rtoks)]
    assert ours.shape == (len(rtoks),)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cores, llama_threads, overlap", [(2, 2, False), (2, 1, True), (8, 4, True), (1, None, False)])
def test_the_delta_step_overlaps_only_with_a_spare_core(tiny_gguf, monkeypatch, cores, llama_threads, overlap):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    target = TargetLLM(tiny_gguf, n_ctx=64, n_threads=1)
    monkeypatch.setattr(target.llm, "n_threads", llama_threads)
    assert Engine(target).overlap is overlap
    assert Engine(target, overlap=not overlap).overlap is (not overlap)      # an explicit choice wins


@pytest.mark.parametrize("with_delta", [False, True])
def test_logit_bias_bans_tokens_with_and_without_a_delta(tiny_gguf, tmp_path, with_delta):
    """A -inf bias bans a token (the blocklist baseline); it holds whatever the delta's shift says."""
    import math

    from cmc_edge.runtime.engine import Delta

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    deltas = []
    if with_delta:
        from tiny_checkpoint import make_tiny_bundle

        deltas = [Delta(make_tiny_bundle(tmp_path / "b"), target, alpha=3.0)]
    eng = Engine(target, deltas)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    free = eng.generate(PROMPT, params)
    free.read()
    banned = tuple(sorted(set(free.tokens)))[:3]
    biased = eng.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0.0,
                                                 logit_bias=tuple((t, -math.inf) for t in banned)))
    biased.read()
    assert biased.tokens and not set(biased.tokens) & set(banned)
    assert biased.tokens != free.tokens
    with pytest.raises(InputError, match="logit_bias"):
        eng.generate(PROMPT, SamplingParams(max_tokens=2, logit_bias=((10**9, -1.0),))).read()


def test_the_bundles_shift_floor_drops_small_shifts(tiny_gguf, tmp_path):
    """``shift_floor`` in the manifest reaches the runtime: a floor above every shift leaves the
    target's own answer; without one the same delta changes it; a floor is kept per delta."""
    import json

    from cmc_edge.runtime.engine import Delta
    from tiny_checkpoint import make_tiny_bundle

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    plain = Engine(target, []).generate(PROMPT, params)
    plain.read()
    bundle = make_tiny_bundle(tmp_path / "b")
    steered = Engine(target, [Delta(bundle, target, alpha=3.0)]).generate(PROMPT, params)
    steered.read()
    assert steered.tokens != plain.tokens
    m = json.loads((bundle / "manifest.json").read_text())
    m["shift_floor"] = 1e6
    (bundle / "manifest.json").write_text(json.dumps(m))
    delta = Delta(bundle, target, alpha=3.0)
    assert delta.mapped.floor == 1e6
    floored = Engine(target, [delta]).generate(PROMPT, params)
    floored.read()
    assert floored.tokens == plain.tokens


def test_a_bundle_runs_at_the_strength_chosen_for_this_exact_model(tiny_gguf, tmp_path):
    """``model_alphas`` (set by a recipe per checked model) decides the alpha on that model file;
    any other file runs at ``default_alpha``; an alpha the caller gives always wins."""
    import shutil

    from cmc_edge.export.bundle import set_default_alpha, set_model_alpha
    from cmc_edge.runtime.engine import Delta
    from tiny_checkpoint import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    set_default_alpha(bundle, 1.0, reason="test")
    set_model_alpha(bundle, tiny_gguf, 0.5, reason="test: chosen on validation")
    other = tmp_path / "other.gguf"
    shutil.copyfile(tiny_gguf, other)
    with open(other, "ab") as fh:                 # another file (llama.cpp ignores trailing bytes)
        fh.write(b"\0" * 64)
    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    d = Delta(bundle, target)
    assert (d.alpha, d.alpha_source) == (0.5, "chosen for this model")
    assert Delta(bundle, target, alpha=2.0).alpha == 2.0
    elsewhere = Delta(bundle, TargetLLM(other, n_ctx=256, n_threads=1))
    assert (elsewhere.alpha, elsewhere.alpha_source) == (1.0, "the bundle's default")
    # the strength reaches the decode loop: the chosen alpha steers as that alpha given by hand does
    params = SamplingParams(max_tokens=16, temperature=0.0)
    runs = [Engine(target, [dl]).generate(PROMPT, params) for dl in (d, Delta(bundle, target, alpha=0.5))]
    for r in runs:
        r.read()
    assert runs[0].tokens == runs[1].tokens
