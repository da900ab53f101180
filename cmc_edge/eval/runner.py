"""Measure what a delta does to a target LLM: recall on question sets, perplexity, tokens/s.

Everything here runs through the runtime (llama.cpp + ONNX delta), exactly as users decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

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


def perplexity(engine, text: str, *, alphas=None, max_tokens: int = 400) -> float:
    """Teacher-forced perplexity of ``text`` (its first ``max_tokens`` tokens) under ``engine``'s
    target LLM, shifted by its deltas at ``alphas`` (default: their own), each delta reading the
    same text in its own tokenization, as at decode time. Scores through the model the engine has
    loaded (:meth:`~cmc_edge.runtime.engine.Engine.score_text`); tokens 1..N-1 are scored."""
    return float(np.exp(np.mean(engine.score_text(text, alphas=alphas, max_tokens=max_tokens))))


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
