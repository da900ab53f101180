"""Measure what a delta does to a target LLM: recall on question sets, perplexity, tokens/s.

Everything here runs through the runtime (llama.cpp + ONNX delta), exactly as users decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from cmc_edge.combine import log_softmax_np, mapped_shift_np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecallResult:
    split: str
    correct: int
    total: int
    tokens: int
    seconds: float
    samples: tuple = ()

    @property
    def recall(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def recall_eval(engine, items: list[dict], *, alphas=None, max_tokens: int = 24, progress=None,
                keep_samples: int = 3) -> dict[str, RecallResult]:
    """Greedy-answer each ``{"question", "answers", "split"}`` item; an answer counts when an alias appears."""
    from cmc_edge.eval.scoring import answer_recalled
    from cmc_edge.runtime.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n\n",))
    acc: dict[str, list] = {}
    for it in items:
        gen = engine.chat([{"role": "user", "content": it["question"]}], params, alphas=alphas)
        text = gen.read()
        ok = answer_recalled(text, it["answers"])
        acc.setdefault(it["split"], []).append((ok, len(gen.tokens), gen.seconds, it["question"], text))
        if progress is not None:
            progress.update(1)
    out = {}
    for split, rows in acc.items():
        out[split] = RecallResult(split, sum(r[0] for r in rows), len(rows), sum(r[1] for r in rows),
                                  sum(r[2] for r in rows),
                                  tuple((q, t, bool(ok)) for ok, _, _, q, t in rows[:keep_samples]))
    return out


def perplexity(model_path, text: str, deltas=(), alphas=(), *, n_ctx: int = 1024, max_tokens: int = 400) -> float:
    """Teacher-forced perplexity of ``text`` under the target LLM, shifted by ``deltas`` (each
    reading the same text in its own tokenization, as at decode time). Tokens 1..N-1 are scored."""
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(model_path, n_ctx=n_ctx, logits_all=True)
    toks = target.tokenize(text)[: min(max_tokens, n_ctx)]
    target.llm.reset()
    target.llm.eval(toks)
    scores = np.array(target.llm.scores[: len(toks)], dtype=np.float32)           # (N, V)
    first = 1 if target.piece(toks[0]) == b"" else 0                                # skip BOS
    trackers = []
    for d, a in zip(deltas, alphas):
        if a != 0.0:
            prompt_text = target.piece(toks[first]).decode("utf-8", errors="replace")
            trackers.append((d, a, d.tracker(prompt_text)))
    nll = []
    gen = target.piece(toks[first])
    for i in range(first + 1, len(toks)):
        row = scores[i - 1].copy()
        for d, a, tr in trackers:
            prefix = gen[len(target.piece(toks[first])):]
            row += mapped_shift_np(d.head.logits(tr.state_for(prefix)), d.map.index, d.map.mask, a)
        nll.append(-log_softmax_np(row)[toks[i]])
        gen += target.piece(toks[i])
    return float(np.exp(np.mean(nll)))


def tokens_per_second(results: dict[str, RecallResult]) -> float:
    toks = sum(r.tokens for r in results.values())
    secs = sum(r.seconds for r in results.values())
    return toks / secs if secs else float("nan")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
