"""Measure what a delta does to a target LLM: recall on question sets, perplexity, tokens/s.

Everything here runs through the runtime (llama.cpp + ONNX delta), exactly as users decode.
"""

from __future__ import annotations

import logging
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


def recall_eval(engine, items: list[dict], *, alphas=None, max_tokens: int = 24, desc: str | None = None,
                keep_samples: int = 3) -> dict[str, RecallResult]:
    """Greedy-answer each ``{"question", "answers", "split"}`` item (the recipes' one answer loop,
    :func:`~cmc_edge.recipes.scaffold.answer_all`; ``desc``: a progress bar's label, None for none);
    an answer counts when an alias appears."""
    from cmc_edge.eval.scoring import answer_recalled
    from cmc_edge.recipes.scaffold import answer_all

    answers = answer_all(engine, [it["question"] for it in items], alphas=alphas, max_tokens=max_tokens, desc=desc)
    acc: dict[str, list] = {}
    for it, ans in zip(items, answers):
        acc.setdefault(it["split"], []).append((answer_recalled(ans.text, it["answers"]), ans))
    out = {}
    for split, rows in acc.items():
        out[split] = RecallResult(split, sum(ok for ok, _ in rows), len(rows), sum(a.tokens for _, a in rows),
                                  sum(a.seconds for _, a in rows),
                                  tuple((a.prompt, a.text, bool(ok)) for ok, a in rows[:keep_samples]))
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
