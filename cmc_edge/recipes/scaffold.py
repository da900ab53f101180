"""What every recipe shares: a run directory, one greedy-answer loop, the template's own answers,
training and export of the delta, and token bans for the blocklist baseline.

A recipe (:mod:`cmc_edge.recipes.forget`, the demo, the JSON recipe) is a page of data and
choices over these functions.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeConfig:
    """What every training recipe sets: where runs go, the delta's size and training, the models checked."""

    out_root: Path = Path("runs")
    steps: int | None = None             # None: the recipe's own default (:attr:`default_steps`)
    seed: int = 0
    alpha: float = 1.0
    size: str = "15m"
    lr: float = 2e-3
    batch_size: int = 16
    kl_weight: float = 1.0
    objective: str = "sft"
    models: tuple[str, ...] = ("smollm2", "gemma3")
    train_overrides: dict = field(default_factory=dict)

    default_steps = 200                  # a class attribute, not a field

    @property
    def train_steps(self) -> int:
        return self.steps if self.steps is not None else self.default_steps

    def train_config(self, **extra):
        from cmc_edge.train.loop import TrainConfig

        return TrainConfig(objective=self.objective, alpha=self.alpha, size=self.size, steps=self.train_steps,
                           batch_size=self.batch_size, lr=self.lr, kl_weight=self.kl_weight, seed=self.seed,
                           **{**self.train_overrides, **extra})


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    tokens: int
    seconds: float
    ids: tuple[int, ...] = ()          # the generated token ids

    @classmethod
    def of(cls, prompt: str, gen) -> "Answer":
        """The answer an engine's finished :class:`~cmc_edge.runtime.engine.Generation` gave to ``prompt``."""
        return cls(prompt, gen.text, len(gen.tokens), gen.seconds, tuple(gen.tokens))


def answer_all(engine, prompts: Sequence[str], *, alphas: Sequence[float] | None = None, max_tokens: int = 32,
               system: str | None = None, logit_bias=(), desc: str | None = None,
               stop: tuple[str, ...] = ("\n\n",), side_by_side: int = 1) -> list[Answer]:
    """Greedy answers of ``engine`` to each prompt as a user turn (``alphas``: the deltas' strength,
    None for theirs; ``logit_bias``: token bans, the blocklist baseline). The one answer loop of
    every recipe. ``side_by_side`` > 1 decodes that many prompts at once
    (:meth:`~cmc_edge.runtime.engine.Engine.generate_many`: 1.2-2x faster on 2 cores for short answers; an
    answer's ``seconds`` then overlap with the others', so time the whole call for a speed)."""
    from tqdm.auto import tqdm

    from cmc_edge.runtime.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, logit_bias=tuple(logit_bias))

    def messages(p: str) -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]

    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, unit="q", leave=False)
    with bar:
        if side_by_side > 1:
            gens = engine.chat_many([messages(p) for p in prompts], params, alphas=alphas, n_seq=side_by_side,
                                    on_done=lambda i, g: bar.update())
        else:
            gens = []
            for p in prompts:
                gen = engine.chat(messages(p), params, alphas=alphas)
                gen.read()
                gens.append(gen)
                bar.update()
    return [Answer.of(p, g) for p, g in zip(prompts, gens)]


def answer_at(engine, prompts: Sequence[str], strengths: Sequence[Sequence[float]], *, max_tokens: int = 32,
              stop: tuple[str, ...] = ("\n\n",), desc: str | None = None, side_by_side: int = 1,
              logit_biases: Sequence[Sequence[tuple[int, float]]] | None = None) -> list[list[Answer]]:
    """:func:`answer_all` at each set of ``strengths`` (one alpha per delta; ``logit_biases[k]``:
    the bias with ``strengths[k]``, e.g. the blocklist's bans at alpha 0): ``out[k][i]`` is prompt
    ``i`` at ``strengths[k]``. Side by side, a prompt's answers are decoded in one sequence, one
    after another (:meth:`~cmc_edge.runtime.engine.Engine.generate_many`): llama.cpp evaluates the
    prompt once (~30% of a short answer's cost on 2 cores), and a later answer only from where it
    first parts from an earlier one; the answers are those :func:`answer_all` gives at each strength."""
    from tqdm.auto import tqdm

    from cmc_edge.runtime.engine import SamplingParams

    biases = [tuple(b) for b in logit_biases] if logit_biases is not None else [()] * len(strengths)
    if len(biases) != len(strengths):
        raise ValueError(f"{len(biases)} logit biases for {len(strengths)} strengths")
    if side_by_side <= 1 or len(strengths) < 2:
        return [answer_all(engine, prompts, alphas=a, max_tokens=max_tokens, stop=stop, desc=desc,
                           side_by_side=side_by_side, logit_bias=b) for a, b in zip(strengths, biases)]
    n = len(strengths)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    with tqdm(total=n * len(prompts), desc=desc, disable=desc is None, unit="q", leave=False) as bar:
        gens = engine.chat_many([[{"role": "user", "content": p}] for p in prompts for _ in strengths], params,
                                each_alphas=[list(a) for _ in prompts for a in strengths],
                                each_bias=[b for _ in prompts for b in biases], n_seq=side_by_side,
                                on_done=lambda i, g: bar.update())
    return [[Answer.of(p, g) for p, g in zip(prompts, gens[k::n])] for k in range(n)]


def tokens_per_second(answers: Sequence[Answer]) -> float:
    """Decoding speed over ``answers``: all their tokens over all their seconds (NaN for none)."""
    secs = sum(a.seconds for a in answers)
    return sum(a.tokens for a in answers) / secs if secs else float("nan")


def new_run_dir(root, prefix: str) -> Path:
    """A new, empty run directory ``root/<prefix>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... appended
    when a run started in the same second), so a run never writes into another's files."""
    stamp = Path(root) / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    Path(root).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = stamp if n == 1 else stamp.with_name(f"{stamp.name}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        log.info("run directory %s", run_dir)
        return run_dir
    raise FileExistsError(f"{stamp}: no free run directory name")


def jsonable(d: dict) -> dict:
    """``d`` as JSON would give it back: paths and other non-JSON values as strings (for a report's config)."""
    return json.loads(json.dumps(d, default=str))


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line (UTF-8, not escaped): a recipe's training records."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def template_engine(model_path, n_ctx: int = 1024):
    from cmc_edge.runtime.engine import Engine
    from cmc_edge.runtime.target import TargetLLM

    return Engine(TargetLLM(model_path, n_ctx=n_ctx, n_threads=2), overlap=False)


def template_answers(model_path, prompts, max_tokens: int, side_by_side: int = 1) -> list[str]:
    """The template's own greedy answers (llama.cpp), used as retain targets for broad prompts."""
    eng = template_engine(model_path, n_ctx=512)
    try:
        return [a.text.strip() for a in answer_all(eng, prompts, max_tokens=max_tokens, stop=(),
                                                   side_by_side=side_by_side)]
    finally:
        eng.close()


def train_and_export(run_dir: Path, template_path, train_cfg, roles=("forget", "retain"), *,
                     max_len: int = 256, progress: bool = True, template=None, template_cache: dict | None = None
                     ) -> Path:
    """Train on ``run_dir/<role>.jsonl`` for each role with ``train_cfg`` (a TrainConfig) and export
    the bundle to ``run_dir/bundle`` (``template``: the template already loaded from ``template_path``;
    ``template_cache``: its log-probs kept across trainings, :func:`cmc_edge.train.loop.train`)."""
    from cmc_edge.train.data import encode_records, read_jsonl
    from cmc_edge.train.loop import train
    from cmc_edge.train.template import load_template

    tpl = template if template is not None else load_template(template_path)
    data = {role: encode_records(read_jsonl(run_dir / f"{role}.jsonl"), tpl.tokenizer, tpl.prompt_format, role,
                                 max_len) for role in roles}
    ckpt = train(tpl, data, train_cfg, run_dir / "checkpoint", progress=progress, template_cache=template_cache)
    del tpl, data
    gc.collect()
    return export_checked(ckpt, run_dir / "bundle")


def export_checked(checkpoint: Path, out: Path) -> Path:
    """Export with the INT8 graph; when INT8 moves the shift past its tolerance, export the fp32
    graph alone (exact, about 4x larger) instead of failing the recipe after its training. An fp32
    graph that does not reproduce PyTorch still fails."""
    from cmc_edge.errors import ExportValidationError
    from cmc_edge.export import export_bundle

    try:
        return export_bundle(checkpoint, out)
    except ExportValidationError as e:
        log.warning("%s: this bundle gets the fp32 graph only", e)
        return export_bundle(checkpoint, out, int8=False)


def banned_tokens(target, strings: Sequence[str], min_chars: int = 2) -> tuple[int, ...]:
    """Target-vocabulary tokens that begin one of ``strings`` (leading whitespace ignored): the ids a
    blocklist bans with a logit bias of -inf. The same rule the trainer's ``avoid`` strings use on
    the delta's vocabulary (``cmc_edge.train.data.avoid_token_ids``). Single characters are kept
    out: banning "A" would silence every word starting with A, so "A" + "u" still spells "Au"."""
    wanted = [s.strip() for s in strings if s.strip()]
    variants = {w for s in wanted for w in (s, s.lower(), s.capitalize(), s.upper())}
    out = []
    for i in range(target.n_vocab):
        t = target.piece(i).decode("utf-8", errors="ignore").lstrip()
        if len(t) >= min_chars and any(w.startswith(t) or t.startswith(w) for w in variants):
            out.append(i)
    return tuple(out)


class Stopwatch:
    """Named phase timings: ``with sw("train"): ...``; ``sw.seconds`` maps phase -> seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, name: str):
        sw = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                sw.seconds[name] = round(sw.seconds.get(name, 0.0) + time.perf_counter() - self.t, 1)

        return _Phase()

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0
