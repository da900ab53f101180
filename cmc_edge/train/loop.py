"""The CMC training loop: only the delta learns; the template is frozen (and optionally cached).

Per predicted token, with template log-probs ``t`` (V,) and delta logits ``d`` (V,), the combined
model is ``c = log_softmax(t) + alpha * d`` (:func:`cmc_edge.combine.combine_torch`). The loss terms
are pure functions of the batch, ``d`` and ``t`` (:mod:`cmc_edge.train.objectives`, which lists
them): CE towards refusals and taught text, KL to the template (or a teacher text) on kept words
and retain records, bounded ascent (unlearn-gd), unlikelihood plus a hinge on avoided tokens, and
L2 on the centred delta logits. This module draws the batches, runs the delta, sums the terms,
steps and logs; it also owns what needs the template model:

- Template log-probs at the loss positions (the response tokens), computed once per example under
  no_grad and kept (float16) when ``cache_template`` is on, so later steps run the delta only.
- Teacher targets: at kept tokens aligned with a "teacher" text, the template's prediction where it
  reads that text instead (its free-form answer): inside a taught format it should speak as it
  does outside it.
- ``--delta-ends-turn``: the template's end-of-turn scores are replaced by log(1/V) and the rows
  renormalised (template and teacher rows alike), so the delta learns where replies end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cmc_edge.errors import CmcError, InputError
from cmc_edge.train.objectives import batch_from_examples, end_of_turn_masked, loss_terms
from cmc_edge.train.objectives import combined_losses  # noqa: F401  (public here too: tests and recipes import it)

log = logging.getLogger(__name__)

Objective = Literal["sft", "unlearn-idk", "unlearn-gd"]
OBJECTIVES: tuple[str, ...] = ("sft", "unlearn-idk", "unlearn-gd")


@dataclass(frozen=True)
class TrainConfig:
    objective: Objective = "sft"
    alpha: float = 1.0
    size: str = "15m"
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 10
    kl_weight: float = 1.0
    ascent_ceiling: float = 8.0
    avoid_weight: float = 1.0
    avoid_margin: float = 16.0
    shift_l2: float = 0.0                 # weight of sum_v (centred delta logit)^2 per position
    keep_l2: float = 0.0                  # the same, only at "keep" positions (sft records)
    retain_l2: float = 0.0                # the same, only at "retain" records' positions
    delta_ends_turn: bool = False         # the delta, not the template, decides where a reply ends
    start_margin: float = 0.0             # end-of-turn held below -margin (centred) at each reply's start; 0: off
    embed_init: str = "template"          # "template" (SVD of the template's embeddings) | "random"
    save_every: int = 50                  # resume state every N steps (0: never)
    grad_accum: int = 1                   # micro-batches per optimizer step
    max_len: int = 256
    seed: int = 0
    device: str = "cpu"
    cache_template: bool = True
    gate_lr_mult: float = 25.0
    init_from: str = ""                   # a checkpoint directory whose weights start the delta ("": fresh)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.embed_init not in ("template", "random"):
            raise InputError(f"unknown embed_init {self.embed_init!r}", fix='use "template" or "random"')
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}", fix=f"use one of {list(OBJECTIVES)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"alpha must be a positive finite number, got {self.alpha}", fix="e.g. --alpha 1.0")
        for name in ("steps", "batch_size", "max_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1", fix="pass a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be positive, got {self.lr}", fix="e.g. --lr 2e-3")
        if self.save_every < 0:
            raise InputError(f"--save-every must be >= 0, got {self.save_every}", fix="0 turns resume state off")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


@contextlib.contextmanager
def kept_heap():
    """Keep freed memory in the process heap while training on a CPU (glibc only; elsewhere a no-op).

    Every step allocates and frees a dozen (N, V) float buffers of ~70 MB. glibc serves blocks above
    its mmap threshold (at most 32 MB) with a fresh mmap each time, so each buffer's pages are
    faulted in and zeroed by the kernel again, step after step: about half of a step's time on 2
    cores (BENCHMARKS.md). With mmap off and trimming off for the duration, freed buffers are reused;
    on exit the heap is trimmed. Numbers are unchanged: only where the memory comes from differs.

    Any mallopt call turns glibc's adaptive mmap threshold off for the rest of the process, so the
    exit settings are the ones that adaptation reaches (blocks up to 32 MB from the heap, trim above
    twice that): the decoding that follows in the same process keeps reusing its per-token buffers."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield False
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield True
    finally:
        mallopt(_M_MMAP_MAX, 65536)                # glibc's default
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)       # where glibc's adaptive threshold tops out (64-bit)
        mallopt(_M_TRIM_THRESHOLD, 64 << 20)       # and its trim threshold then (2x)
        trim(0)


def _pad_batch(examples, pad_id: int):
    """Right-padded ids, attention mask and, per example, the positions predicting response tokens."""
    import torch

    L = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, e in enumerate(examples):
        seq = e.ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        p, r = len(e.prompt_ids), len(e.response_ids)
        for k in range(r):
            rows.append(i)
            cols.append(p - 1 + k)
            targets.append(e.response_ids[k])
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def _split(model):
    """(body, head) of a causal LM with a separate decoder and output layer, else None."""
    import torch

    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return body, head
    return None


def _logits_at(model, ids, mask, rows, cols, prefix=None):
    """The template's logits at positions (rows, cols) only: the body runs on the whole batch, the
    output layer (a quarter of SmolLM2's work per token, and a (B, L, V) buffer) only where a loss
    reads it. Models without a separate decoder and head get the full forward, then the rows.

    ``prefix``: (P, cache, kwarg) from :func:`_shared_prefix`, the body's keys and values for the
    first P tokens, which every row of ``ids`` begins with, and the name the body takes them by:
    only the rest is run (columns shift by P)."""
    import copy

    import torch

    parts = _split(model)
    if parts is None:
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols]
    body, head = parts
    if prefix is None:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        n, cache, kwarg = prefix
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(ids.shape[0])
        hidden = body(input_ids=ids[:, n:], attention_mask=mask, use_cache=True, **{kwarg: past}).last_hidden_state
        cols = cols - n
    logits = head(hidden[rows, cols])
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _cache_kwarg(body) -> str:
    """The name the decoder's forward takes its KV cache by (transformers 5.x renames it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


# Below this many shared tokens the prefix is run with every chunk (copying its cache costs more).
_MIN_SHARED_PREFIX = 8


def _shared_prefix(model, examples):
    """(P, cache, kwarg) for the longest token prefix every example's prompt begins with (the chat format's
    system turn: 24 of SmolLM2's 64 tokens per forget-recipe record), leaving each example at least
    one prompt token so its first response position stays in the part that is run; None when the
    prefix is shorter than ``_MIN_SHARED_PREFIX`` or the model has no separate decoder.
    The prefix's keys and values are computed once, not once per chunk: about 30% of the template's
    work on the forget recipe's records (BENCHMARKS.md)."""
    import os

    import torch
    from transformers import DynamicCache

    parts = _split(model)
    if parts is None or not examples:
        return None
    n = min(len(os.path.commonprefix([list(e.prompt_ids) for e in examples])),
            min(len(e.prompt_ids) for e in examples) - 1)
    if n < _MIN_SHARED_PREFIX:
        return None
    body, cache = parts[0], DynamicCache(config=model.config)
    kwarg = _cache_kwarg(body)
    ids = torch.tensor([list(examples[0].prompt_ids[:n])], device=model.device)
    body(input_ids=ids, use_cache=True, **{kwarg: cache})
    return n, cache, kwarg


def template_logprobs(model, examples, pad_id: int, chunk: int = 8):
    """log_softmax(template) at each example's response-predicting positions: list of (R_i, V) float16,
    in the order of ``examples``. Chunks are formed by length (less padding), results put back in
    order; a prefix all examples share is run once (:func:`_shared_prefix`)."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    got = {}
    with torch.no_grad():
        prefix = _shared_prefix(model, examples)
        for s in range(0, len(order), chunk):
            idx = order[s : s + chunk]
            batch = [examples[i] for i in idx]
            ids, mask, rows, cols, _ = _pad_batch(batch, pad_id)
            dev = model.device
            logits = _logits_at(model, ids.to(dev), mask.to(dev), rows.to(dev), cols.to(dev), prefix)
            lp = torch.log_softmax(logits.float(), dim=-1)                       # (N, V)
            sizes = [len(e.response_ids) for e in batch]
            got.update(zip(idx, (t.to(torch.float16).cpu() for t in lp.split(sizes))))
    return [got[i] for i in range(len(examples))]


def _teacher_example(e):
    """The template reading the prompt and then the example's teacher text."""
    from cmc_edge.train.data import Example

    return Example(e.prompt_ids, e.teacher_ids, e.role)


def _teacher_targets(tlp, batch, sft_idx, tcache: dict, model, pad_id: int):
    """KL targets for a batch, (N, V) log-probs: the template's own (``tlp``), except at kept tokens
    aligned with a teacher token, where the template's prediction of that token in the teacher
    text (cached per sft example in ``tcache``, else computed here). None if no example has a teacher."""
    import torch

    taught = [n for n, e in enumerate(batch) if e.teacher_ids and e.role == "sft"]
    if not taught:
        return None
    need = [n for n in taught if sft_idx[n] not in tcache]
    fresh = dict(zip(need, template_logprobs(model, [_teacher_example(batch[n]) for n in need], pad_id)))
    out, row = tlp.clone(), 0
    for n, e in enumerate(batch):
        if n in taught:
            lp = fresh[n] if n in fresh else tcache[sft_idx[n]]
            pos = torch.tensor(e.teacher_pos, dtype=torch.long)
            at = torch.nonzero(pos >= 0).squeeze(1)
            out[row + at] = lp[pos[at]].float()
        row += len(e.response_ids)
    return out


def _distributed(device: str):
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world, device, owned)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, owned


def _head(delta):
    """The delta as one module (ids, mask, rows, cols) -> logits at the loss positions, for DDP."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.delta = delta

        def forward(self, ids, mask, rows, cols):
            hidden = self.delta.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return self.delta.lm_head(hidden[rows, cols])

    return Head()


class _StopFlag:
    """SIGINT/SIGTERM set ``requested`` (the step in flight finishes, then state is saved)."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class TrainingInterrupted(CmcError):
    """SIGINT/SIGTERM arrived: the resume state was saved; rerun with ``--resume``."""

    exit_code = 130


def resume_dir(out_dir: str | Path) -> Path:
    """Where a run writing ``out_dir`` keeps its resume state (beside it, removed on success)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".resume")


def _config_key(cfg: TrainConfig, data: dict) -> str:
    import hashlib

    same = {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "device")}
    sizes = {r: [[len(e.ids), len(e.teacher_ids)] if e.teacher_ids else len(e.ids) for e in data[r]]
             for r in sorted(data) if data[r]}
    return hashlib.sha256(json.dumps([same, sizes], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_resume(path: Path, delta, opt, sched, gen, step: int, loss_log: list, key: str) -> None:
    """Weights as safetensors, optimizer/scheduler/RNG as plain tensors (loaded with weights_only=True)."""
    import torch
    from safetensors.torch import save_file

    from cmc_edge.artifacts import atomic_dir

    with atomic_dir(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in delta.state_dict().items()
                   if k != "lm_head.weight"}, str(tmp / "delta.safetensors"))
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "config_key": key, "loss_log": loss_log}))


def _load_delta_weights(delta, path: Path) -> tuple[list, list]:
    """Load a safetensors file of delta weights (the tied output layer may be absent) and tie the
    output layer to the embeddings again; returns (missing, unexpected) keys."""
    from safetensors.torch import load_file

    missing, unexpected = delta.load_state_dict(load_file(str(path)), strict=False)
    delta.tie_weights()
    return missing, unexpected


def _load_resume(path: Path, delta, opt, sched, gen, key: str) -> tuple[int, list]:
    import torch

    prog = json.loads((path / "progress.json").read_text())
    if prog["config_key"] != key:
        raise InputError(f"{path} was saved by a run with other settings or data",
                         fix=f"rerun with the original settings, or delete {path} to start over")
    _load_delta_weights(delta, path / "delta.safetensors")
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    return prog["step"], prog["loss_log"]


def plot_loss(loss_log: list[dict], path: Path) -> None:
    """The loss curve (total and each term) as PNG, next to ``loss_log.json``."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no loss.png (pip install 'cmc-edge[train]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in loss_log]
    terms = [k for k in (loss_log[0] if loss_log else {}) if k not in ("step", "tokens_per_s")]
    for k in terms:
        ax.plot(steps, [r.get(k) for r in loss_log], label=k, lw=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _new_delta(template, cfg: TrainConfig):
    """A fresh delta for ``template``'s vocabulary (its logits all zero: the combined model starts
    as the template), embeddings from the template's where configured, on ``cfg.device``; with
    ``cfg.init_from``, the weights of that checkpoint instead (same template, same size)."""
    from cmc_edge.train.model import DeltaConfig, build_delta, init_embeddings_from_template

    tok = template.tokenizer
    dcfg = DeltaConfig.preset(cfg.size, vocab_size=template.vocab_size,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    delta = build_delta(dcfg, seed=cfg.seed)
    if cfg.init_from:
        _load_weights(delta, dcfg, Path(cfg.init_from), template)
    elif cfg.embed_init == "template":
        kept = init_embeddings_from_template(delta, template.model.get_input_embeddings().weight)
        log.info("delta embeddings from the template's (SVD, %.0f%% of variance kept)", 100 * kept)
    delta = delta.to(cfg.device)
    delta.train()
    return delta, dcfg


def _load_weights(delta, dcfg, ckpt: Path, template) -> None:
    """Start ``delta`` from the checkpoint in ``ckpt`` (``train``'s output), which must have been
    trained beside the same template with the same delta shape."""
    fix = "pass a checkpoint trained beside this template with this --size, or no initial checkpoint"
    try:
        meta = json.loads((ckpt / "cmc.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot start the delta from {ckpt}: {exc}", fix=fix) from exc
    if meta.get("template", {}).get("vocab_hash") != template.vocab_hash or meta.get("delta_config") != dcfg.to_dict():
        raise InputError(f"{ckpt} was trained beside another template or with another delta shape", fix=fix)
    try:
        missing, unexpected = _load_delta_weights(delta, ckpt / "model.safetensors")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot start the delta from {ckpt}: {exc}", fix=fix) from exc
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise InputError(f"{ckpt} does not hold this delta's weights (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})", fix=fix)
    log.info("delta starts from the weights in %s", ckpt)


def _end_of_turn_ids(template) -> list[int]:
    """The template's end-of-turn token ids (its EOS and its chat format's end-of-turn token)."""
    tok = template.tokenizer
    return sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids(template.prompt_format.end_of_turn or ""))
                   if isinstance(i, int) and i != tok.unk_token_id})


def _template_cache(template, data: dict, roles, pad_id: int, known: dict | None = None) -> tuple[dict, dict]:
    """Template log-probs of every example ({role: [(R, V)]}) and of every sft example's teacher
    text ({index in data["sft"]: (R_teacher, V)}), computed once (float16).

    ``known``: log-probs by example (prompt and response ids), kept by the caller across trainings
    with the same template: only examples not in it are run, and they are added to it. The forget
    recipe's second filter reuses the first's this way (the same records plus prose)."""
    t0 = time.perf_counter()
    known = {} if known is None else known
    todo = list({_example_key(e): e for r in roles for e in data[r] if _example_key(e) not in known}.values())
    if todo:
        known.update(zip(map(_example_key, todo), template_logprobs(template.model, todo, pad_id)))
    cache = {r: [known[_example_key(e)] for e in data[r]] for r in roles}
    taught = [i for i, e in enumerate(data.get("sft", ())) if e.teacher_ids]
    tcache = dict(zip(taught, template_logprobs(template.model, [_teacher_example(data["sft"][i]) for i in taught],
                                                 pad_id))) if taught else {}
    n = sum(len(data[r]) for r in roles)
    log.info("cached template log-probs in %.1fs (%d of %d examples run, the rest known)",
             time.perf_counter() - t0, len(todo), n)
    return cache, tcache


def _example_key(e) -> tuple:
    """What an example's template log-probs depend on: its prompt and response tokens."""
    return tuple(e.prompt_ids), tuple(e.response_ids)


def _optimizer(delta, cfg: TrainConfig):
    """AdamW with warmup then cosine decay; the output gate learns ``gate_lr_mult`` times faster."""
    import torch

    # The zero-initialised final-norm weight gates every logit; Adam moves it ~lr per step, so at
    # the base rate the delta would need thousands of steps to speak. It gets a higher rate.
    gate = [delta.model.norm.weight]
    rest = [p for p in delta.parameters() if p is not gate[0]]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gate, "lr": cfg.lr * cfg.gate_lr_mult}],
                            lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    return opt, sched


def _write_checkpoint(out_dir: Path, delta, tokenizer, meta: dict, loss_log: list, *, overwrite: bool) -> None:
    """The HF checkpoint, atomically: weights, tokenizer, cmc.json, loss_log.json, loss.png."""
    from cmc_edge.artifacts import atomic_dir

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        delta.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cmc.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "loss_log.json").write_text(json.dumps(loss_log) + "\n")
        plot_loss(loss_log, tmp / "loss.png")
    log.info("wrote delta checkpoint %s", out_dir)


def train(template, data: dict, cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True,
          overwrite: bool = False, resume: bool = False, on_step=None, template_cache: dict | None = None) -> Path:
    """Train a delta beside ``template`` on ``data`` ({"sft"|"forget"|"retain": [Example]}) and
    write an HF checkpoint (config.json, model.safetensors, tokenizer, cmc.json, loss_log.json).

    Every ``cfg.save_every`` steps the resume state goes (atomically) to ``<out>.resume/``; with
    ``resume`` a run continues from it and ends with the same weights as an uninterrupted run.
    SIGINT/SIGTERM save the state and raise :class:`TrainingInterrupted`. ``on_step(step, record)``
    is called after every step (progress hooks, tests). ``template_cache``: a dict the caller keeps
    to reuse the template's log-probs in a later training with the same template (it is filled here).

    Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) the same call trains with
    DistributedDataParallel (gloo on CPU, nccl on CUDA, ``cuda:LOCAL_RANK``): every rank draws its
    own batches, gradients are averaged, rank 0 writes the checkpoint and the resume state."""
    import torch
    from tqdm.auto import tqdm

    from cmc_edge.train.model import count_parameters

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists", fix="choose another --out or pass --overwrite")
    roles = [r for r in ("sft", "forget", "retain") if data.get(r)]
    if cfg.objective == "sft" and not data.get("sft"):
        raise InputError("the sft objective needs training examples", fix="pass --data FILE.jsonl")
    if cfg.objective.startswith("unlearn") and not data.get("forget"):
        raise InputError(f"the {cfg.objective} objective needs forget examples", fix="pass --forget FILE.jsonl")

    rank, world, device, owned_group = _distributed(cfg.device)
    if device != cfg.device:
        from dataclasses import replace

        cfg = replace(cfg, device=device)
    torch.manual_seed(cfg.seed)
    # Under torchrun every rank draws its own batches (seed + rank); DDP averages the gradients.
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    tok = template.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    delta, dcfg = _new_delta(template, cfg)
    net = _head(delta)
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = ddp = DistributedDataParallel(net, device_ids=[torch.device(cfg.device).index]
                                            if cfg.device.startswith("cuda") else None)
        progress = progress and rank == 0
    log.info("delta: %s preset, %.1fM parameters", cfg.size, count_parameters(delta) / 1e6)

    end_ids = _end_of_turn_ids(template) if cfg.delta_ends_turn or cfg.start_margin > 0 else []
    eot_ids = end_ids if cfg.delta_ends_turn else []
    on_cpu = str(cfg.device).startswith("cpu")
    with kept_heap() if on_cpu else contextlib.nullcontext():
        cache, tcache = (_template_cache(template, data, roles, pad_id, template_cache) if cfg.cache_template
                         else ({}, {}))
    opt, sched = _optimizer(delta, cfg)
    # Each step draws from every role present: half forget / half retain for unlearning.
    share = {r: max(1, cfg.batch_size // len(roles)) for r in roles}
    loss_log = []
    key = _config_key(cfg, data)
    rdir = resume_dir(out_dir)
    start = 0
    if resume:
        if not (rdir / "progress.json").is_file():
            raise InputError(f"nothing to resume: {rdir} does not exist",
                             fix="run without --resume (a run saves resume state every --save-every steps)")
        start, loss_log = _load_resume(rdir, delta, opt, sched, gen, key)
        if world > 1:   # only rank 0's sampler state is saved; the others start a fresh stream
            gen.manual_seed(cfg.seed + 1000 * rank + start)
        log.info("resuming from step %d (%s)", start, rdir)
    stop = _StopFlag()
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, unit="step",
               initial=start, total=cfg.steps)
    t_start, n_tok = time.perf_counter(), 0

    def micro_step():
        """Draw one micro-batch, return (loss, terms, tokens)."""
        picks = [(r, i) for r in roles for i in torch.randint(len(data[r]), (share[r],), generator=gen).tolist()]
        batch = [data[r][i] for r, i in picks]
        ids, mask, rows, cols, targets = _pad_batch(batch, pad_id)
        if cfg.cache_template:
            tlp = torch.cat([cache[r][i] for r, i in picks]).float()
        else:
            tlp = torch.cat(template_logprobs(template.model, batch, pad_id)).float()
        d = net(ids.to(cfg.device), mask.to(cfg.device), rows.to(cfg.device), cols.to(cfg.device))  # (N, V)
        sft_idx = [i if r == "sft" else None for r, i in picks]
        kl_target = _teacher_targets(tlp, batch, sft_idx, tcache, template.model, pad_id)
        # Where a reply ends is a property of the template's chat format; another LLM in another
        # format gets no such signal. With delta_ends_turn the template's end-of-turn scores are
        # replaced by a uniform guess, so the delta itself must learn when to end (and not to):
        # in the template rows and in every KL target, teacher rows included.
        tlp = end_of_turn_masked(tlp, eot_ids)
        kl_target = end_of_turn_masked(kl_target, eot_ids) if kl_target is not None else None
        b = batch_from_examples(batch, rows, targets, tlp, roles=[r for r, _ in picks], kl_target=kl_target,
                                end_ids=end_ids, device=cfg.device)
        terms = loss_terms(b, d, cfg)
        return sum(terms.values()), terms, int(mask.sum())

    with stop, kept_heap() if on_cpu else contextlib.nullcontext():
        for step in bar:
            opt.zero_grad(set_to_none=True)
            for m in range(cfg.grad_accum):
                sync = ddp is None or m == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    loss, terms, nt = micro_step()
                    if not torch.isfinite(loss):
                        raise InputError(f"training diverged at step {step} (loss {loss.item()})",
                                         fix="lower --lr or --alpha")
                    (loss / cfg.grad_accum).backward()
                n_tok += nt * world
            torch.nn.utils.clip_grad_norm_(delta.parameters(), 1.0)
            opt.step()
            sched.step()
            rec = {"step": step + 1, "loss": round(loss.item(), 5),
                   **{k: round(v.item(), 5) for k, v in terms.items()},
                   "tokens_per_s": round(n_tok / (time.perf_counter() - t_start), 1)}
            loss_log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if on_step is not None:
                on_step(step + 1, rec)
            done = step + 1
            if rank == 0 and (stop.requested or (cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps)):
                _save_resume(rdir, delta, opt, sched, gen, done, loss_log, key)
            if stop.requested:
                raise TrainingInterrupted(f"training stopped by {stop.requested} at step {done}; state saved in {rdir}",
                                          fix="rerun the same command with --resume")

    delta.eval()
    meta = {
        "format": "cmc-edge-checkpoint",
        "format_version": 1,
        "alpha": cfg.alpha,
        "objective": cfg.objective,
        "template": template.describe(),
        "prompt_format": template.prompt_format.to_dict(),
        "delta_config": dcfg.to_dict(),
        "train_config": asdict(cfg),
        "examples": {r: len(data[r]) for r in roles},
        "world_size": world,
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    if rank == 0:
        _write_checkpoint(out_dir, delta, tok, meta, loss_log, overwrite=overwrite)
        import shutil

        shutil.rmtree(rdir, ignore_errors=True)   # the run is complete: its resume state is spent
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if owned_group:
            dist.destroy_process_group()
    return out_dir
