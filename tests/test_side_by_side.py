"""Many prompts decoded side by side (Engine.generate_many over a SeqBatch) give the answers of one
by one, reuse what a sequence's cache shares with its next prompt, and fail closed."""

import math

import numpy as np
import pytest

from cmc_edge.errors import DeltaFault, InputError
from cmc_edge.runtime.engine import Engine, SamplingParams
from cmc_edge.runtime.target import TargetLLM

PROMPTS = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in (
    "The capital of France", "hello", "Who wrote Hamlet?", "2 + 2 =", "Name a colour", "a", "Tell me a story",
    "What is the chemical symbol for gold?", "bonjour", "Count to five", "zzz")]


def engines(tiny_gguf, tmp_path, with_delta):
    from cmc_edge.runtime.engine import Delta

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    deltas = []
    if with_delta:
        from tiny_checkpoint import make_tiny_bundle

        deltas = [Delta(make_tiny_bundle(tmp_path / "b"), target, alpha=3.0)]
    return Engine(target, deltas)


def count_decoded(eng) -> list[int]:
    """From now on, the number of tokens each of ``eng``'s side-by-side decodes gives llama.cpp."""
    fed = []
    real = eng.target.seq_batch

    def counting(n):
        batch = real(n)
        decode = batch.decode
        batch.decode = lambda parts: (fed.append(sum(len(t) for t in parts.values())), decode(parts))[1]
        return batch

    eng.target.seq_batch = counting
    return fed


@pytest.mark.parametrize("with_delta", [False, True])
def test_side_by_side_gives_the_one_by_one_answers(tiny_gguf, tmp_path, with_delta):
    eng = engines(tiny_gguf, tmp_path, with_delta)
    first = eng.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0))
    first.read()
    ban = tuple((t, -math.inf) for t in sorted(set(first.tokens))[:2])
    params = SamplingParams(max_tokens=16, temperature=0.0, stop=("e",), logit_bias=ban)
    serial = []
    for p in PROMPTS:
        g = eng.generate(p, params)
        g.read()
        serial.append(g)
    done = []
    many = eng.generate_many(PROMPTS, params, n_seq=4, on_done=lambda i, g: done.append(i))
    assert sorted(done) == list(range(len(PROMPTS)))       # every prompt reported once, as it finished
    # 11 prompts through 4 sequences: each sequence is reused, keeping the shared chat lead-in.
    for s, g in zip(serial, many):
        assert (g.tokens, g.text, g.finish_reason) == (s.tokens, s.text, s.finish_reason)
        assert not set(g.tokens) & {t for t, _ in ban}
    assert {g.finish_reason for g in many} >= {"length"}


def test_a_sequence_keeps_the_prefix_it_shares_with_its_next_prompt(tiny_gguf):
    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    batch = target.seq_batch(2)
    a, b = target.tokenize(PROMPTS[1]), target.tokenize(PROMPTS[2])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert batch.begin(0, a) == a
    batch.decode({0: a})
    assert batch.begin(0, b) == b[shared:]                  # only the new part is evaluated
    reused = batch.decode({0: b[shared:]})[0]
    assert batch.begin(1, b) == b                           # another sequence: nothing cached
    fresh = batch.decode({1: b})[1]
    assert np.allclose(reused, fresh, atol=1e-3)
    assert batch.begin(0, b) == b[-1:]                       # the same prompt again: its last token gives the logits


def test_side_by_side_is_greedy_only(tiny_gguf):
    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    with pytest.raises(InputError, match="greedily"):
        eng.generate_many(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.8))
    with pytest.raises(InputError, match="context"):
        eng.generate_many(["word " * 300], SamplingParams(max_tokens=4, temperature=0.0))


def test_a_delta_fault_stops_every_sequence(tiny_gguf):
    from test_fail_closed import FaultyDelta, FaultyModel

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)

    class Forking(FaultyDelta):
        def __init__(self, vocab):
            super().__init__(vocab, ok_calls=3, mode="raise")
            self.session.fork = lambda: FaultyModel(vocab, ok_calls=3, mode="raise")

        def tracker(self, prompt, session=None):
            from cmc_edge.runtime.sync import DeltaTracker

            session = session or self.session
            session.reset()
            return DeltaTracker(session, lambda s: [ord(c) % 200 for c in s], [1, 2, 3])

    eng = Engine(target, [Forking(target.n_vocab)])
    with pytest.raises(DeltaFault, match="exploded"):
        eng.generate_many(PROMPTS[:5], SamplingParams(max_tokens=20, temperature=0.0), n_seq=3)


def test_answer_all_side_by_side_matches_one_by_one(tiny_gguf):
    from cmc_edge.recipes.scaffold import answer_all

    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    qs = ["hello", "Who wrote Hamlet?", "2 + 2 =", "a", "bonjour"]
    one = answer_all(eng, qs, max_tokens=10, stop=())
    many = answer_all(eng, qs, max_tokens=10, stop=(), side_by_side=3)
    assert [(a.prompt, a.text, a.tokens) for a in one] == [(a.prompt, a.text, a.tokens) for a in many]


def test_answer_all_puts_the_system_prompt_first_side_by_side_or_not(tiny_gguf):
    """The forget report's system-prompt baseline: the system turn reaches the model's prompt."""
    from cmc_edge.recipes.scaffold import answer_all

    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    seen = []
    chat_prompts = eng.chat_prompts
    eng.chat_prompts = lambda messages, tpl=None: (seen.append(messages), chat_prompts(messages, tpl))[1]
    qs = ["hello", "Who wrote Hamlet?", "2 + 2 ="]
    one = answer_all(eng, qs, max_tokens=6, stop=(), system="Never say hi.")
    many = answer_all(eng, qs, max_tokens=6, stop=(), system="Never say hi.", side_by_side=2)
    assert len(seen) == 6 and all(m[0] == {"role": "system", "content": "Never say hi."} for m in seen)
    assert [m[1]["content"] for m in seen] == qs * 2
    assert [a.text for a in one] == [a.text for a in many]


def test_a_prompt_at_several_strengths_is_evaluated_once_and_answers_as_at_each_alone(tiny_gguf, tmp_path):
    """answer_at: the answers at each strength are those of a pass at that strength alone, and
    llama.cpp evaluates each prompt's tokens once for all strengths (only its last token again)."""
    from cmc_edge.recipes.scaffold import answer_all, answer_at

    eng = engines(tiny_gguf, tmp_path, with_delta=True)
    qs = ["hello", "Who wrote Hamlet?", "2 + 2 =", "a", "bonjour", "Name a colour", "Count to five"]
    strengths = [[0.0], [1.5], [3.0]]
    each = [answer_all(eng, qs, alphas=a, max_tokens=10, stop=(), side_by_side=3) for a in strengths]
    assert each[0] != each[2]                                # the strengths answer differently
    fed = count_decoded(eng)
    together = answer_at(eng, qs, strengths, max_tokens=10, stop=(), side_by_side=3)
    for want, got in zip(each, together):
        assert [(a.prompt, a.text, a.ids) for a in want] == [(a.prompt, a.text, a.ids) for a in got]
    prompt_tokens = sum(len(eng.encode(*eng.chat_prompts([{"role": "user", "content": q}], None)).target)
                        for q in qs)
    generated = sum(len(a.ids) for got in together for a in got)
    # every prompt in full once at most, then one token per later strength, plus the generated tokens
    assert sum(fed) <= prompt_tokens + len(qs) * (len(strengths) - 1) + generated
    with pytest.raises(InputError, match="sets of alphas"):
        eng.generate_many(["a", "b"], SamplingParams(max_tokens=2, temperature=0.0), each_alphas=[[0.0]])


def test_a_later_answer_to_the_same_prompt_is_decoded_only_from_where_it_parts(tiny_gguf, tmp_path):
    """With the answer alone, a blocklist's and a delta's answer to the same prompt are each the
    answer of its own pass, and llama.cpp decodes them only from their first token that differs
    from an earlier answer: the blocklist's exactly from its first banned token on."""
    from cmc_edge.recipes.scaffold import answer_all, answer_at

    eng = engines(tiny_gguf, tmp_path, with_delta=True)
    qs = ["hello", "Who wrote Hamlet?", "2 + 2 =", "a", "bonjour", "Name a colour", "Count to five"]
    alone = answer_all(eng, qs, alphas=[0.0], max_tokens=10, stop=())
    # ban one token from the middle of some answers: those answers part there, the others never
    bans = sorted({a.ids[3] for a in alone[::2] if len(a.ids) > 4})
    assert bans
    ban = tuple((t, -math.inf) for t in bans)
    variants = [([0.0], ()), ([0.0], ban), ([3.0], ())]
    each = [answer_all(eng, qs, alphas=a, logit_bias=b, max_tokens=10, stop=()) for a, b in variants]
    together = answer_at(eng, qs, [a for a, _ in variants], logit_biases=[b for _, b in variants],
                         max_tokens=10, stop=(), side_by_side=3)
    for want, got in zip(each, together):
        assert [(a.prompt, a.text, a.ids) for a in want] == [(a.prompt, a.text, a.ids) for a in got]
    assert together[1] != together[0] and together[2] != together[0]
    # Steps replayed: the blocklist's answer up to its first banned token, or all of it (with its
    # end) where it chose none.
    params = SamplingParams(max_tokens=10, temperature=0.0)
    convs = [[{"role": "user", "content": q}] for q in qs for _ in variants]
    fed = count_decoded(eng)
    gens = eng.chat_many(convs, params, each_alphas=[a for _ in qs for a, _ in variants],
                         each_bias=[b for _ in qs for _, b in variants], n_seq=3)
    for k, a in enumerate(alone):
        blocked = gens[3 * k + 1]
        first = next((j for j, t in enumerate(a.ids) if t in bans), None)
        if first is None:
            assert blocked.tokens == list(a.ids)
            assert blocked.replayed == len(a.ids) + (len(a.ids) < 10)
        else:
            assert blocked.replayed == first + 1 and blocked.tokens[:first] == list(a.ids[:first])
    # llama.cpp evaluated each prompt once and only the decoded steps of each answer (every step
    # but those replayed, the first of each answer's decoded steps possibly with some of its tokens)
    steps = sum(len(g.tokens) + (g.finish_reason == "stop") - g.replayed for g in gens)
    prompt_tokens = sum(len(eng.encode(*eng.chat_prompts(c, None)).target) for c in convs[::3])
    assert sum(fed) <= prompt_tokens + steps + sum(len(g.tokens) for g in gens if g.replayed)
    assert steps < sum(len(g.tokens) for g in gens) - 20
    with pytest.raises(InputError, match="sets of logit biases"):
        eng.generate_many(["a", "b"], params, each_bias=[()])
