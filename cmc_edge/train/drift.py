"""Collateral damage of a trained delta, measured on text it never trained on.

An unlearning filter should leave everything except its facts alone. A filter trained on too little
or too narrow retain data can instead learn "refuse" rather than "refuse these", or push common
sub-word tokens everywhere, and nothing in the training loss shows it. After training, the combined
model (``log_softmax(template) + alpha * delta``, :func:`cmc_edge.combine.combine_torch`) is compared
with the template alone on held-out data (:mod:`cmc_edge.recipes.forget_data`, never training data):

- everyday prose (``VALIDATION_PROSE``), teacher-forced on the raw text: perplexity under each model
  and the mean per-token KL(template || combined), the *drift*;
- general questions (``VALIDATION_GENERAL``) in the template's chat format, greedy-decoded for
  ``max_new_tokens``: how many answers come out (recall) and how many replies refuse.

:func:`drift_warnings` turns a report into plain sentences when it crosses :class:`DriftLimits`.

>>> r = {"alpha": 1.0, "ppl": {"template": 20.0, "combined": 30.0}, "ppl_change": 0.5,
...      "recall": {"template": 0.9, "combined": 0.9}, "refusals": {"template": 0.0, "combined": 0.0}}
>>> [w.split(" (")[0] for w in drift_warnings(r)]
['perplexity on held-out prose rose 50.0%']
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cmc_edge.eval.scoring import is_refusal
from cmc_edge.errors import InputError

log = logging.getLogger(__name__)

ADVICE = ("to keep the filter to its facts, try more and broader --retain data (ordinary prompts answered as the "
          "template answers them), a higher --kl-weight, fewer --steps, or `cmc-edge forget`, which builds that "
          "data itself and chooses the filter's strength on held-out questions")

@dataclass(frozen=True)
class DriftLimits:
    """When a delta counts as damaging unrelated text (each a difference, combined minus template)."""

    ppl_rise: float = 0.05          # relative perplexity rise on prose that warns (>=)
    recall_drop: float = 0.10       # general-question recall drop that warns (>, as a fraction)
    refusal_rise: float = 0.20      # rise in the share of refusals that warns (>)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def prose_drift(template_model, delta, alpha: float, tokenizer, texts: Sequence[str]) -> dict:
    """Teacher-forced mean NLL of ``texts`` under the template and the combined model, and the mean
    per-token KL(template || combined); tokens 1..N-1 of each text are scored."""
    import torch

    from cmc_edge.combine import combine_torch

    limit = delta.config.max_position_embeddings
    nll_t = nll_c = kl = 0.0
    n = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:limit]],
                               device=template_model.device)                              # (1, L)
            t = torch.log_softmax(template_model(input_ids=ids).logits[0, :-1].float(), -1)  # (L-1, V)
            d = delta(input_ids=ids).logits[0, :-1]                                       # (L-1, V)
            c = torch.log_softmax(combine_torch(t, d, alpha), -1)                         # (L-1, V)
            tgt = ids[0, 1:, None]
            nll_t -= t.gather(1, tgt).sum().item()
            nll_c -= c.gather(1, tgt).sum().item()
            kl += (t.exp() * (t - c)).sum().item()
            n += tgt.shape[0]
    if not n:
        raise InputError("the drift check's prose has no tokens to score", fix="pass texts of two tokens or more")
    return {"tokens": n, "nll": {"template": nll_t / n, "combined": nll_c / n}, "kl": max(kl / n, 0.0)}


def _shift_processor(delta, alpha: float, prompt_mask):
    """A transformers logits processor: the template's next-token logits combined with the delta's,
    which reads the whole left-padded sequence again at every step (no KV cache: 20 steps of a
    small delta cost less than keeping a second cache in step with generate's)."""
    import torch
    from transformers import LogitsProcessor

    from cmc_edge.combine import combine_torch

    class Shift(LogitsProcessor):
        def __call__(self, input_ids, scores):                                           # (B, L), (B, V)
            grown = input_ids.shape[1] - prompt_mask.shape[1]
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], grown)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            d = delta(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                      logits_to_keep=1).logits[:, -1]                                    # (B, V)
            return combine_torch(scores, d, alpha)

    return Shift()


def greedy_answers(template, delta, alpha: float, questions: Sequence[str],
                   max_new_tokens: int = 20) -> list[str]:
    """Greedy replies to each question as a user turn in the template's chat format (batched, left
    padded); ``delta`` None: the template alone."""
    import torch
    from transformers import GenerationConfig

    from cmc_edge.prompt import render_prompt
    from cmc_edge.train.loop import _end_of_turn_ids

    tok = template.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    prompts = [tok(render_prompt(template.prompt_format, [{"role": "user", "content": q}]),
                   add_special_tokens=False)["input_ids"] for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=template.model.device)   # (B, P)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                           eos_token_id=_end_of_turn_ids(template) or None)
    procs = [_shift_processor(delta, alpha, mask)] if delta is not None else []
    with torch.no_grad():
        out = template.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                                      logits_processor=procs)                            # (B, P + new)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]


def measure_drift(template, delta, alpha: float, *, texts: Sequence[str] | None = None,
                  questions: Sequence[tuple[str, Sequence[str]]] | None = None, max_new_tokens: int = 20,
                  limits: DriftLimits = DriftLimits()) -> dict:
    """The drift report of ``delta`` at ``alpha`` beside ``template`` (a :class:`Template`): prose
    perplexity and KL, general-question recall and refusals, each answer, and the warnings.
    ``texts`` and ``questions`` default to the held-out sets of :mod:`cmc_edge.recipes.forget_data`."""
    from cmc_edge.eval.scoring import answer_recalled
    from cmc_edge.recipes.forget_data import VALIDATION_GENERAL, VALIDATION_PROSE

    texts = VALIDATION_PROSE if texts is None else texts
    questions = VALIDATION_GENERAL if questions is None else questions
    if not questions:
        raise InputError("the drift check needs at least one general question", fix="pass (question, answers) pairs")
    t0 = time.perf_counter()
    delta = delta.to(template.model.device).eval()
    prose = prose_drift(template.model, delta, alpha, template.tokenizer, texts)
    asked = [q for q, _ in questions]
    replies = {"template": greedy_answers(template, None, alpha, asked, max_new_tokens),
               "combined": greedy_answers(template, delta, alpha, asked, max_new_tokens)}
    n = len(questions)
    report = {
        "alpha": alpha,
        "prose_tokens": prose["tokens"],
        "ppl": {k: _exp(v) for k, v in prose["nll"].items()},
        "ppl_change": _exp(prose["nll"]["combined"] - prose["nll"]["template"]) - 1,
        "kl": prose["kl"],
        "questions": n,
        "recall": {k: sum(answer_recalled(r, a) for r, (_, a) in zip(rs, questions)) / n for k, rs in replies.items()},
        "refusals": {k: sum(map(is_refusal, rs)) / n for k, rs in replies.items()},
        "answers_changed": sum(a != b for a, b in zip(replies["template"], replies["combined"])) / n,
        "answers": [{"question": q, "expected": list(a), "template": rt, "combined": rc}
                    for (q, a), rt, rc in zip(questions, replies["template"], replies["combined"])],
        "limits": asdict(limits),
    }
    report["warnings"] = drift_warnings(report, limits)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def drift_warnings(report: dict, limits: DriftLimits = DriftLimits()) -> list[str]:
    """One sentence per limit the report crosses (empty: the delta leaves unrelated text alone)."""
    out = []
    ppl, rec, ref = report["ppl"], report["recall"], report["refusals"]
    if not report["ppl_change"] < limits.ppl_rise:         # NaN counts as a rise: nothing vouches for it
        out.append(f"perplexity on held-out prose rose {100 * report['ppl_change']:.1f}% ({_num(ppl['template'])} -> "
                   f"{_num(ppl['combined'])}; limit +{100 * limits.ppl_rise:.0f}%): the filter shifts ordinary text, "
                   "not only its facts")
    if rec["template"] - rec["combined"] > limits.recall_drop:
        out.append(f"general-question recall fell {100 * (rec['template'] - rec['combined']):.0f} points "
                   f"({100 * rec['template']:.0f}% -> {100 * rec['combined']:.0f}%; limit "
                   f"{100 * limits.recall_drop:.0f}): the filter damages answers it was never meant to touch")
    if ref["combined"] - ref["template"] > limits.refusal_rise:
        out.append(f"refusals on general questions rose {100 * (ref['combined'] - ref['template']):.0f} points "
                   f"({100 * ref['template']:.0f}% -> {100 * ref['combined']:.0f}%; limit "
                   f"{100 * limits.refusal_rise:.0f}): the filter learned to refuse in general, not to refuse its facts")
    return out


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def format_drift(report: dict) -> str:
    """The report as a short table."""
    ppl, rec, ref = report["ppl"], report["recall"], report["refusals"]
    rows = [f"drift check at alpha {report['alpha']:g} (held-out prose: {report['prose_tokens']} tokens; "
            f"{report['questions']} general questions)",
            f"  {'':<26}{'template':>10}{'+ delta':>10}{'change':>10}",
            f"  {'perplexity (prose)':<26}{_num(ppl['template']):>10}{_num(ppl['combined']):>10}"
            f"{100 * report['ppl_change']:>+9.1f}%",
            f"  {'general-question recall':<26}{100 * rec['template']:>9.0f}%{100 * rec['combined']:>9.0f}%"
            f"{100 * (rec['combined'] - rec['template']):>+6.0f} pts",
            f"  {'refusals':<26}{100 * ref['template']:>9.0f}%{100 * ref['combined']:>9.0f}%"
            f"{100 * (ref['combined'] - ref['template']):>+6.0f} pts",
            f"  mean KL(template || combined) on prose: {report['kl']:.4f} nats/token; "
            f"answers changed: {round(report['answers_changed'] * report['questions'])} of {report['questions']}",
            "  verdict: " + ("DAMAGES UNRELATED TEXT" if report["warnings"] else "unrelated text kept")]
    return "\n".join(rows)


def check_checkpoint_drift(template, checkpoint_dir: str | Path, *, limits: DriftLimits = DriftLimits(),
                           log_warnings: bool = True) -> dict:
    """Measure the drift of the delta checkpoint at ``checkpoint_dir`` (at its own alpha) beside
    ``template`` and write it to ``checkpoint_dir/drift.json``; warnings are logged (unless
    ``log_warnings`` is off: the CLI prints them itself)."""
    from cmc_edge.artifacts import write_json
    from cmc_edge.export.bundle import load_delta_model, read_checkpoint

    ckpt = read_checkpoint(checkpoint_dir)
    if ckpt.meta["template"].get("vocab_hash") != template.vocab_hash:
        raise InputError(f"{ckpt.root} was trained beside another template ({ckpt.meta['template'].get('source')})",
                         fix="measure the drift beside the template the delta was trained with")
    report = measure_drift(template, load_delta_model(ckpt), ckpt.alpha, limits=limits)
    write_json(ckpt.root / "drift.json", report)
    log.info("drift check in %.1fs: perplexity %+.1f%%, KL %.4f; wrote %s", report["seconds"],
             100 * report["ppl_change"], report["kl"], ckpt.root / "drift.json")
    if log_warnings:
        for w in report["warnings"]:
            log.warning("%s", w)
        if report["warnings"]:
            log.warning("%s", ADVICE)
    return report
