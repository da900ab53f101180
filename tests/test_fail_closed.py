"""Fail closed: a fault in the delta path stops generation; no token sampled after the fault is emitted."""

import numpy as np
import pytest

from cmc_edge.errors import DeltaFault
from cmc_edge.prompt import PromptFormat
from cmc_edge.runtime.engine import Engine, SamplingParams
from cmc_edge.runtime.shift import DeltaHead, MappedHead
from cmc_edge.runtime.sync import DeltaTracker
from cmc_edge.runtime.target import TargetLLM

HIDDEN = 8
PROMPT = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


class FaultyModel:
    """A delta session that works for ``ok_calls`` feeds, then fails the way ``mode`` says."""

    def __init__(self, vocab, ok_calls, mode):
        self.vocab, self.ok_calls, self.mode = vocab, ok_calls, mode
        self.max_positions, self.calls, self.seq = 512, 0, []

    @property
    def n_past(self):
        return len(self.seq)

    def feed(self, ids):
        self.calls += 1
        self.seq.extend(ids)
        if self.calls > self.ok_calls:
            if self.mode == "raise":
                raise RuntimeError("onnxruntime exploded")
            return np.full(HIDDEN, np.nan, np.float32)
        return np.zeros(HIDDEN, np.float32)                     # the final hidden state: a zero shift

    def rollback(self, n):
        del self.seq[n:]

    def reset(self):
        self.seq = []


class FaultyDelta:
    """Duck-types runtime.engine.Delta with an identity map."""

    def __init__(self, vocab, ok_calls, mode):
        self.session = FaultyModel(vocab, ok_calls, mode)
        self.name, self.alpha = "faulty", 1.0
        self.head = DeltaHead(np.random.default_rng(0).normal(size=(vocab, HIDDEN)).astype(np.float32))
        self.mapped = MappedHead(self.head, np.arange(vocab), np.ones(vocab, bool))
        self.prompt_format = PromptFormat(chat_template=None)

    def encode(self, text):
        return [1, 2, 3]

    def tracker(self, prompt):
        self.session.reset()
        return DeltaTracker(self.session, lambda s: [ord(c) % 200 for c in s], [1, 2, 3])


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_engine_stops_at_the_fault(tiny_gguf, mode, overlap):
    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    plain = Engine(target).generate(PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=5))
    plain_text = plain.read()
    assert len(plain.tokens) > 6
    delta = FaultyDelta(target.n_vocab, ok_calls=4, mode=mode)  # prompt + 3 generated tokens succeed
    gen = Engine(target, [delta], overlap=overlap).generate(PROMPT, SamplingParams(max_tokens=20, temperature=1.0,
                                                                                   seed=5))
    got = []
    with pytest.raises(DeltaFault):
        for chunk in gen:
            got.append(chunk)
    assert gen.finish_reason == "error"
    # The zero shift changes nothing, so what was emitted is a prefix of the plain output; it
    # stopped early, and nothing ran after the failing delta step (exactly one failed call).
    assert plain_text.startswith("".join(got))
    assert len("".join(got)) < len(plain_text) and len(gen.tokens) < 20
    assert delta.session.calls == 5


def test_processor_fails_closed_inside_llama_cpp(tiny_gguf):
    from llama_cpp import LogitsProcessorList

    from cmc_edge.runtime.processor import CMCLogitsProcessor

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    ptoks = target.tokenize(PROMPT)
    plain = target.llm.create_completion(PROMPT, max_tokens=20, temperature=0.0)["choices"][0]
    assert plain["finish_reason"] == "length"
    delta = FaultyDelta(target.n_vocab, ok_calls=3, mode="raise")
    proc = CMCLogitsProcessor(target, [delta], prompt_tokens=len(ptoks), delta_prompts=[PROMPT])
    out = target.llm.create_completion(PROMPT, max_tokens=20, temperature=0.0,
                                       logits_processor=LogitsProcessorList([proc]))["choices"][0]
    # The swallowed exception did not let generation run on: it ended at the fault.
    assert out["finish_reason"] == "stop"
    assert len(out["text"]) < len(plain["text"])
    with pytest.raises(DeltaFault, match="exploded"):
        proc.raise_if_failed()
