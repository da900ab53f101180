"""Training objectives as pure loss terms: (batch, delta logits, config) -> named scalars.

Every term reads one micro-batch at its N loss positions (the response tokens of every
example, in order) and returns a scalar, or None where it does not apply to that batch. The
loop (:mod:`cmc_edge.train.loop`) draws the batch, calls :func:`loss_terms`, sums, steps and
logs; nothing here runs a model or touches an optimizer.

Per position, with template log-probs ``t`` (V,) and delta logits ``d`` (V,)::

    c = log_softmax(log_softmax(t) + alpha * d)          # cmc_edge.combine.combine_torch, normalised
    ce = -c[target]                 kl = KL(softmax(q) || softmax(c))    (q: the KL target, t by default)

    sft       learnt tokens of "sft" records:  mean ce
    keep      kept tokens of "sft" records:    kl_weight * mean kl      (q: the teacher's rows where given)
    keep_l2   the same tokens:                 keep_l2 * mean sum_v centred(d)_v^2
    forget    "forget" records (not kept):     mean ce  (unlearn-idk: the refusal)
                                               mean relu(ascent_ceiling - ce)  (unlearn-gd: bounded ascent)
    avoid     rows with avoided tokens:        avoid_weight * (mean -log(1 - P_c(avoided))
                                                               + mean_avoided relu(avoid_margin + centred(d)))
              (a record's avoid set on each of its rows; its avoid_next set on the row after its kept words)
    retain    "retain" records:                kl_weight * mean kl  (unlearn-gd adds mean ce)
    retain_l2 the same positions:              retain_l2 * mean sum_v centred(d)_v^2
    shift_l2  every position:                  shift_l2 * mean sum_v centred(d)_v^2
    start     each reply's first position:     avoid_weight * mean relu(start_margin + centred(d)[end of turn])

A new term is a function ``term(batch, scores, cfg) -> Tensor | None`` added to :data:`TERMS`,
usually with a weight field on :class:`~cmc_edge.train.loop.TrainConfig` (0 turns it off).

>>> import torch
>>> t = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0]]), -1)
>>> b = Batch(targets=torch.tensor([1]), template=t, roles={"retain": torch.tensor([True])},
...           keep=torch.tensor([False]))
>>> s = score(b, torch.zeros(1, 3), alpha=1.0)       # a delta that is still a no-op
>>> round(float(s.kl[0]), 6), round(float(s.ce[0]), 4)  # combined == template: KL 0, CE -log p(1)
(0.0, 2.2395)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from cmc_edge.combine import centred_torch, combine_torch

if TYPE_CHECKING:
    from torch import Tensor

    from cmc_edge.train.loop import TrainConfig


@dataclass(frozen=True)
class Batch:
    """One micro-batch at its N loss positions. Built by :func:`batch_from_examples` in training."""

    targets: Tensor                   # (N,) the response token each position predicts
    template: Tensor                  # (N, V) template log-probs (end-of-turn masked where configured)
    roles: dict                       # role -> (N,) bool; a role absent from the batch may be missing
    keep: Tensor                      # (N,) bool: kept words (held to the template, not taught)
    avoid: Tensor | None = None       # (N, V) bool: tokens to push down; None when no example avoids any
    kl_target: Tensor | None = None   # (N, V) log-probs KL terms hold the combined model to (None: template)
    start: Tensor | None = None       # (N,) bool: each example's first response position
    end_ids: tuple = ()               # the template's end-of-turn token ids

    def role(self, name: str):
        """(N,) bool positions of ``name`` records (all False where the batch has none)."""
        import torch

        got = self.roles.get(name)
        return got if got is not None else torch.zeros_like(self.keep)


@dataclass(frozen=True)
class Scores:
    """What the combined model does at each position; computed once per batch, read by every term.
    KL is computed only at the rows a term asks for (:meth:`kl_at`): each (N, V) pass costs tens
    of milliseconds on a CPU, and most terms read a fraction of the rows."""

    delta: Tensor             # (N, V) the delta's raw logits
    logp: Tensor              # (N, V) combined log-probs
    ce: Tensor                # (N,) cross-entropy of the target token
    target: Tensor            # (N, V) the log-probs KL terms compare with (kl_target, else the template)

    def kl_at(self, rows):
        """KL(target || combined) at the positions ``rows`` ((N,) bool) only. -> (rows.sum(),)"""
        return kl_to(self.target[rows], self.logp[rows])

    @property
    def kl(self):
        """KL(target || combined) at every position. (N,)"""
        return kl_to(self.target, self.logp)


def combined_logprobs(template_lp, delta_logits, alpha: float):
    """The combined model's normalised log-probs. (N, V), (N, V) -> (N, V)"""
    import torch

    return torch.log_softmax(combine_torch(template_lp, delta_logits, alpha), dim=-1)


def cross_entropy(logp, targets):
    """-log p(target) per position. (N, V), (N,) -> (N,)"""
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def kl_to(target_lp, logp):
    """KL(softmax(target_lp) || softmax(logp)) per position; both are log-probs. (N, V) x 2 -> (N,)"""
    q = target_lp.float()
    return (q.exp() * (q - logp)).sum(-1)


def unlikelihood(logp, avoid):
    """-log(1 - P(any avoided token)) per position (clamped below 1, never inf). (N, V), (N, V) bool -> (N,)"""
    import torch

    p_avoid = logp.masked_fill(~avoid, float("-inf")).logsumexp(-1).exp()           # (N,)
    return -torch.log1p(-p_avoid.clamp(max=1 - 1e-6))


def centred_square(delta_logits):
    """sum_v (d_v - mean(d))^2 per position: how far the delta's shift is from flat. (N, V) -> (N,)"""
    return centred_torch(delta_logits).pow(2).sum(-1)


def end_of_turn_masked(template_lp, eot_ids: Sequence[int]):
    """Template log-probs with the end-of-turn tokens' scores replaced by a uniform guess
    (log 1/V) and the rows renormalised: the delta, not the template, decides where a reply ends.
    Returns the input unchanged when ``eot_ids`` is empty. (N, V) -> (N, V)

    Renormalising keeps the rows valid log-probs, so they can serve as a KL target (a KL to an
    unnormalised target is not zero where the combined model equals it).
    """
    import torch

    if not eot_ids:
        return template_lp
    out = template_lp.float().clone()
    out[:, list(eot_ids)] = -math.log(out.shape[-1])
    return torch.log_softmax(out, dim=-1)


def score(batch: Batch, delta_logits, alpha: float) -> Scores:
    """The combined model's log-probs, CE and KL at every position of ``batch``."""
    logp = combined_logprobs(batch.template, delta_logits, alpha)
    q = batch.template if batch.kl_target is None else batch.kl_target
    return Scores(delta=delta_logits, logp=logp, ce=cross_entropy(logp, batch.targets), target=q)


# --- the terms ----------------------------------------------------------------------------------

def _learnt(b: Batch):
    return b.role("sft") & ~b.keep


def _held(b: Batch):
    return b.role("sft") & b.keep


def sft_term(b: Batch, s: Scores, cfg: TrainConfig):
    """CE on the taught tokens of sft records."""
    learn = _learnt(b)
    return s.ce[learn].mean() if learn.any() else None


def keep_term(b: Batch, s: Scores, cfg: TrainConfig):
    """KL to the template (or the teacher) on kept words: the delta learns the format, not the words."""
    held = _held(b)
    return cfg.kl_weight * s.kl_at(held).mean() if held.any() else None


def keep_l2_term(b: Batch, s: Scores, cfg: TrainConfig):
    """Flat shift on kept words: KL ignores tokens the template rules out; another LLM may not."""
    held = _held(b)
    if not (cfg.keep_l2 > 0 and held.any()):
        return None
    return cfg.keep_l2 * centred_square(s.delta[held]).mean()


def forget_term(b: Batch, s: Scores, cfg: TrainConfig):
    """CE towards the refusal (unlearn-idk), or bounded ascent on the true answer (unlearn-gd).
    A forget record's kept words (``keep``) are read, not taught."""
    f = b.role("forget") & ~b.keep
    if not f.any():
        return None
    if cfg.objective == "unlearn-gd":
        import torch

        return torch.relu(cfg.ascent_ceiling - s.ce[f]).mean()
    return s.ce[f].mean()


def avoid_term(b: Batch, s: Scores, cfg: TrainConfig):
    """Unlikelihood of the avoided tokens under the combined model, plus a hinge on the delta's own
    (centred) logit for them: another LLM may be surer of the answer than the template, so the
    push-down must not depend on the template's probability."""
    import torch

    if b.avoid is None or not cfg.avoid_weight > 0:
        return None
    has = b.avoid.any(-1)                                                            # (N,)
    if not has.any():
        return None
    avoid = b.avoid[has]                                                              # (H, V), H rows avoid something
    ul = unlikelihood(s.logp[has], avoid)                                             # (H,)
    hinge = (torch.relu(cfg.avoid_margin + centred_torch(s.delta[has])).masked_fill(~avoid, 0.0).sum(-1)
             / avoid.sum(-1))                                                         # (H,)
    return cfg.avoid_weight * (ul.mean() + hinge.mean())


def retain_term(b: Batch, s: Scores, cfg: TrainConfig):
    """KL to the template on retain records (stay silent); unlearn-gd also keeps their CE."""
    r = b.role("retain")
    if not r.any():
        return None
    if cfg.objective == "unlearn-gd":
        return s.ce[r].mean() + cfg.kl_weight * s.kl_at(r).mean()
    return cfg.kl_weight * s.kl_at(r).mean()


def retain_l2_term(b: Batch, s: Scores, cfg: TrainConfig):
    """Flat shift where the delta must be silent (retain records). KL holds only the tokens the
    template considers: a delta that pushes "Cervantes" down after every *Who wrote ...?* costs no
    KL where the template begins "Don Quixote was written by", but another LLM that answers the
    name at once loses it."""
    r = b.role("retain")
    if not (cfg.retain_l2 > 0 and r.any()):
        return None
    return cfg.retain_l2 * centred_square(s.delta[r]).mean()


def shift_l2_term(b: Batch, s: Scores, cfg: TrainConfig):
    """Keeps the delta's logits near their mean wherever no loss term needs them elsewhere: a token
    the template already rules out gets no gradient from CE/KL, so without this its delta logit
    drifts, and another LLM that does consider that token (Gemma's <eos> at the start of an
    answer) gets an arbitrary push."""
    if not cfg.shift_l2 > 0:
        return None
    return cfg.shift_l2 * centred_square(s.delta).mean()


def start_term(b: Batch, s: Scores, cfg: TrainConfig):
    """A hinge on the delta's own (centred) end-of-turn logits at each reply's first position: no
    reply is empty, so the delta must never push a reply to end before it starts. KL alone does not
    hold them there where the template itself never ends at once (SmolLM2), yet another LLM may
    (Gemma 3 base, asked in a Question/Answer layout, ends at once when pushed)."""
    import torch

    if not (cfg.start_margin > 0 and b.end_ids and b.start is not None and b.start.any()):
        return None
    ends = centred_torch(s.delta[b.start])[:, list(b.end_ids)]                       # (S, E)
    return cfg.avoid_weight * torch.relu(cfg.start_margin + ends).mean()


Term = Callable[[Batch, Scores, "TrainConfig"], "Tensor | None"]

# Name -> term, in the order the loss sums and logs them.
TERMS: dict[str, Term] = {
    "sft": sft_term,
    "keep": keep_term,
    "keep_l2": keep_l2_term,
    "forget": forget_term,
    "avoid": avoid_term,
    "retain": retain_term,
    "retain_l2": retain_l2_term,
    "shift_l2": shift_l2_term,
    "start": start_term,
}


def loss_terms(batch: Batch, delta_logits, cfg: TrainConfig, terms: dict[str, Term] = TERMS) -> dict:
    """Every term that applies to ``batch``, by name (scalars; their sum is the loss)."""
    s = score(batch, delta_logits, cfg.alpha)
    out = {}
    for name, term in terms.items():
        value = term(batch, s, cfg)
        if value is not None:
            out[name] = value
    return out


def batch_from_examples(examples, rows, targets, template_lp, *, roles: Sequence[str] | None = None,
                        kl_target=None, end_ids: Sequence[int] = (), device: str = "cpu") -> Batch:
    """The :class:`Batch` of ``examples`` (training Examples, of ``roles``: default their own)
    whose loss positions are ``rows`` (the example of each position, (N,), in order) predicting
    ``targets`` (N,); ``end_ids``: the template's end-of-turn tokens (for :func:`start_term`)."""
    import torch

    roles = [e.role for e in examples] if roles is None else list(roles)
    names = dict.fromkeys(roles)
    tok_role = [roles[i] for i in rows.tolist()]                              # (N,)
    keep = torch.tensor([f for e in examples for f in (e.keep or (False,) * len(e.response_ids))],
                        dtype=torch.bool, device=device)                       # (N,), same order as rows
    avoid = None
    if any(e.avoid_ids or e.avoid_next_ids for e in examples):
        at, seen = [], {}
        for n, i in enumerate(rows.tolist()):
            e, j = examples[i], seen.get(i, 0)                # j: the position within its response
            seen[i] = j + 1
            at.extend((n, v) for v in e.avoid_ids or ())
            if j == e.avoid_next_at:
                at.extend((n, v) for v in e.avoid_next_ids)
        avoid = torch.zeros((len(tok_role), template_lp.shape[-1]), dtype=torch.bool)
        n_at, v_at = (torch.tensor([x[k] for x in at], dtype=torch.long) for k in (0, 1))
        avoid[n_at, v_at] = True                                             # one scatter, not one per row
        avoid = avoid.to(device)
    start = torch.ones(len(rows), dtype=torch.bool)
    start[1:] = rows[1:] != rows[:-1]
    return Batch(targets=targets.to(device), template=template_lp.to(device),
                 roles={r: torch.tensor([x == r for x in tok_role], device=device) for r in names},
                 keep=keep, avoid=avoid, kl_target=None if kl_target is None else kl_target.to(device),
                 start=start.to(device), end_ids=tuple(end_ids))


def combined_losses(tlp, delta_logits, targets, alpha: float, avoid=None, kl_target=None):
    """Per-token CE and KL of the combined model (and the unlikelihood of ``avoid``, a (N, V) bool
    mask, when given). tlp, delta_logits: (N, V); targets: (N,). The KL is to ``kl_target``
    (log-probs, (N, V)) where given, else to the template itself."""
    logp = combined_logprobs(tlp, delta_logits, alpha)                                # (N, V)
    ce = cross_entropy(logp, targets)                                                 # (N,)
    kl = kl_to(tlp if kl_target is None else kl_target, logp)                        # (N,)
    if avoid is None:
        return ce, kl
    return ce, kl, unlikelihood(logp, avoid)
