"""CMC decoding: llama.cpp generates, one or more deltas shift its logits in place every step.

The loop is llama-cpp-python's own (``Llama.eval`` + the same llama.cpp sampler chain that
``create_completion`` builds), with one change: before each sample, the mapped delta shift is
added straight into llama.cpp's logits buffer for the last position. When the sampler only reads
the top k scores (greedy, top-k), the shift is computed only for the target tokens that can
still reach the top k (:mod:`cmc_edge.runtime.shift`: exact, with a proof per step); greedy
decoding takes the best of them as the token and skips llama.cpp's sampler, which would copy
every score into its candidate array (the token is the one that sampler picks, ties included). Because
the loop is ours and not a ctypes callback, an error in the delta path propagates: generation stops and the
caller gets :class:`~cmc_edge.errors.DeltaFault`; no token sampled without the filter is emitted.

Where the machine has a core to spare beyond llama.cpp's threads, the delta's step for token t
runs in a worker thread while llama.cpp decodes token t (both release the GIL), so its cost
hides behind the LLM's. Where it has not, the step runs between llama.cpp's: a third thread on
two cores preempts one of llama.cpp's, and its partner then waits at the next barrier (measured on
2 cores, 4 alternating runs: serial 72.7 / 82.6 tok/s against overlapped 71.2 / 78.3 for SmolLM2
with the fp32 / INT8 delta).
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cmc_edge.combine import log_softmax_np
from cmc_edge.errors import CmcError, DeltaFault, GenerationTimeout, InputError, TargetFault
from cmc_edge.prompt import Prompt, PromptFormat, prompt_fragments, render_prompt_parts
from cmc_edge.runtime.shift import MappedHead, add_shift_, sampler_top_k, shifted_argmax
from cmc_edge.runtime.sync import DeltaTracker, TailEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling as in llama-cpp-python's ``create_completion`` (same defaults, same sampler chain)."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # (token id, bias) pairs added to the target's logits before the deltas' shift; -inf bans a
    # token (a blocklist: the baseline the unlearning report measures a filter against).
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", fix="e.g. --max-tokens 128")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be finite and >= 0, got {self.temperature}", fix="use 0 for greedy decoding")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", fix="e.g. --top-p 0.95")
        if self.top_k < 0 or not (0.0 <= self.min_p <= 1.0):
            raise InputError("top_k must be >= 0 and min_p in [0, 1]", fix="e.g. --top-k 40 --min-p 0.05")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop sequences must be non-empty strings", fix="drop empty stop strings")
        if any(not isinstance(t, int) or t < 0 or math.isnan(b) for t, b in self.logit_bias):
            raise InputError("logit_bias needs (token id >= 0, bias) pairs", fix="e.g. ((42, -inf),) bans token 42")


def spare_cores(llama_threads: int | None) -> int:
    """Cores this process may use beyond llama.cpp's decode threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                   # not on Linux
        cores = os.cpu_count() or 1
    return max(0, cores - (llama_threads or cores))


@contextmanager
def _blame(error: type[CmcError], what: str):
    """Turn any exception from the block into ``error`` (typed errors pass through): a llama.cpp
    failure is a :class:`TargetFault`, a delta's a :class:`DeltaFault`, never the other way round."""
    try:
        yield
    except CmcError:
        raise
    except Exception as exc:  # noqa: BLE001 - fail closed, saying which side failed
        fix = ("check the delta bundle and token map (`cmc-edge inspect`, `cmc-edge map --stats`)"
               if error is DeltaFault else "check the GGUF model and llama.cpp's resources (memory, --n-ctx)")
        raise error(f"{what}: {exc!r}", fix=fix) from exc


def check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = float("nan")
    if not math.isfinite(a):
        raise InputError(f"alpha must be a finite number, got {alpha!r}", fix="e.g. --alpha 1.0 (0 disables the delta)")
    return a


class Delta:
    """A loaded delta bundle, ready to steer one target vocabulary: ONNX session + tokenizer + token map.

    ``variant``: "int8" or "fp32"; None runs the bundle's INT8 graph where it has one (the fast
    path, checked against fp32 at export) and fp32 otherwise. fp32 is the exact one (tested
    against PyTorch token for token)."""

    def __init__(self, bundle_path: str | Path, target, *, alpha: float | None = None, variant: str | None = None,
                 providers: list[str] | None = None, threads: int = 1, cache_dir: Path | None = None,
                 name: str | None = None):
        from tokenizers import Tokenizer

        from cmc_edge.models import cache_dir as default_cache
        from cmc_edge.runtime.bundle import load_bundle
        from cmc_edge.runtime.onnx_delta import OnnxDelta
        from cmc_edge.tokenmap import cached_token_map, read_tokenizer_json
        from cmc_edge.tokenmap.vocab import parse_tokenizer_json

        self.bundle = load_bundle(bundle_path)
        self.name = name or Path(bundle_path).name
        if alpha is not None:
            self.alpha, self.alpha_source = check_alpha(alpha), "given"
        elif self.bundle.model_alphas:
            from cmc_edge.models import model_digest

            self.alpha, self.alpha_source = self.bundle.alpha_for(model_digest(target.path))
        else:
            self.alpha, self.alpha_source = self.bundle.default_alpha, "the bundle's default"
        log.info("delta %s runs at alpha %g on %s (%s)", self.name, self.alpha, Path(target.path).name,
                 self.alpha_source)
        self.prompt_format = PromptFormat.from_dict(self.bundle.prompt_format or {})
        text = self.bundle.tokenizer_path.read_text(encoding="utf-8")          # read and parsed once
        parsed = parse_tokenizer_json(self.bundle.tokenizer_path, text)
        self.tokenizer = Tokenizer.from_str(text)
        # A second copy that reads special tokens' texts as plain text: for data (message contents,
        # generated text), which must never become the delta's control tokens.
        self.plain_tokenizer = Tokenizer.from_str(text)
        self.plain_tokenizer.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items()
                               if t.special}
        self.tail_encoding = TailEncoder.applies(parsed)
        delta_vocab = read_tokenizer_json(self.bundle.tokenizer_path, parsed)
        if delta_vocab.hash != self.bundle.delta_vocab_hash:
            raise CmcError(f"the tokenizer in {bundle_path} does not match its manifest's vocabulary hash",
                           fix="re-export the bundle with `cmc-edge export`")
        if delta_vocab.size > self.bundle.onnx.vocab_size:
            raise CmcError(f"the tokenizer in {bundle_path} has {delta_vocab.size} tokens but its delta graph only "
                           f"{self.bundle.onnx.vocab_size}: the delta was trained for another vocabulary",
                           fix="re-export it from its training checkpoint (weights and tokenizer together)")
        self.map = cached_token_map(target.path, delta_vocab, (cache_dir or default_cache()) / "maps")
        self.session = OnnxDelta(self.bundle, variant=variant, providers=providers, threads=threads)
        self.variant = self.session.variant
        self.head = self.session.head
        self.mapped = MappedHead(self.head, self.map.index, self.map.mask, floor=self.bundle.shift_floor)

    @property
    def objective(self) -> str | None:
        """The training objective the bundle records ("sft", "unlearn-idk", ...; None if unknown)."""
        obj = self.bundle.manifest.get("objective")
        return obj if isinstance(obj, str) else None

    def encode(self, text: str) -> list[int]:
        """The delta's ids for ``text``: special tokens parsed only in a :class:`Prompt`'s markup
        parts; a plain ``str`` is trusted markup (special tokens parsed everywhere)."""
        if not isinstance(text, Prompt):
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for frag in prompt_fragments(text, self.special_tokens):
            ids.extend(self.encode_plain(frag) if isinstance(frag, str) else [frag])
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """The delta's ids for data: a special token's text is encoded as ordinary text."""
        return self.plain_tokenizer.encode(text, add_special_tokens=False).ids

    def tracker(self, prompt: str | Sequence[int], session=None) -> DeltaTracker:
        """A tracker that has read ``prompt`` (text, or the delta's ids for it); generated text is data.
        ``session``: the delta cache to use (default: the delta's own; see :meth:`OnnxDelta.fork`)."""
        session = session or self.session
        session.reset()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        tail = TailEncoder(self.plain_tokenizer) if self.tail_encoding else None
        return DeltaTracker(session, self.encode_plain, ids, tail=tail)


class TextStream:
    """Token bytes in, text chunks out: never splits a UTF-8 character, never emits a stop string.

    Decoded text that could be the start of a stop string is held back until it cannot be.
    Invalid UTF-8 becomes U+FFFD.

    >>> ts = TextStream(stop=("##",))
    >>> ts.push("é".encode()[:1]), ts.push("é".encode()[1:] + b"a#"), ts.push(b"#b")
    (('', False), ('\xe9a', False), ('', True))
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self._max_stop = max((len(x) for x in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Feed one token's bytes; return (text safe to emit now, whether a stop string was hit)."""
        text = self._pending + self._decoder.decode(piece)
        hit = min((i for i in (text.find(x) for x in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self._pending = ""
            return text[:hit], True
        safe = len(text) - (self._max_stop - 1) if self._max_stop else len(text)
        self._pending = text[max(safe, 0):]
        return text[:max(safe, 0)], False

    def finish(self) -> str:
        """The held-back text at the end of generation (an incomplete character becomes U+FFFD)."""
        tail, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return tail


@dataclass
class Generation:
    """Iterate for text chunks (never splitting a UTF-8 character); stats are filled as it runs."""

    _it: Iterator[str] | None = None
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seconds: float = 0.0
    resyncs: int = 0
    full_shift_steps: int = 0          # steps where the shift was computed over the whole vocabulary
    replayed: int = 0                  # steps whose target logits an earlier answer to the prompt had (generate_many)

    def __iter__(self):
        for chunk in self._it:
            self.text += chunk
            yield chunk

    def read(self) -> str:
        for _ in self:
            pass
        return self.text

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt tokenized for the target (``target``) and for each delta (``deltas[i]``)."""

    target: list[int]
    deltas: list[list[int]]


class Engine:
    """A target LLM plus any number of deltas (each with its own alpha and token map).

    One generation at a time (the target's KV cache and the deltas' sessions are shared); a
    server serializes requests in front of it. Use it as a context manager, or call
    :meth:`close`, to free llama.cpp's memory and the delta worker thread.
    """

    def __init__(self, target, deltas: Sequence[Delta] = (), *, overlap: bool | None = None):
        self.target = target
        self.deltas = list(deltas)
        if overlap is None:                  # a core free beside llama.cpp's threads
            overlap = spare_cores(getattr(target.llm, "n_threads", None)) > 0
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmc-delta") if overlap else None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts -----------------------------------------------------------------------------
    def chat_prompts(self, messages: list[dict], chat_template: str | None = None) -> tuple[Prompt, list[Prompt]]:
        """(target prompt, one delta prompt per delta): each side in its own format, message
        contents kept apart as data (:class:`~cmc_edge.prompt.Prompt`)."""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise InputError(f"bad chat message {str(m)[:80]!r}",
                                 fix='messages are {"role": "system"|"user"|"assistant", "content": str}')
        tgt = render_prompt_parts(self.target.prompt_format(chat_template), messages)
        dps = []
        for d in self.deltas:
            try:
                dps.append(render_prompt_parts(d.prompt_format, messages, keep_all=True))
            except InputError as exc:
                raise InputError(f"delta {d.name!r}: {exc.problem}", fix=exc.fix) from None
        return tgt, dps

    def chat_params(self, params: SamplingParams, chat_template: str | None = None) -> SamplingParams:
        """``params`` plus the stop strings the target's chat layout needs (the base-model Q/A layout's)."""
        extra = tuple(x for x in self.target.prompt_format(chat_template).stop if x not in params.stop)
        return dataclasses.replace(params, stop=params.stop + extra) if extra else params

    def chat(self, messages: list[dict], params: SamplingParams = SamplingParams(), *,
             alphas: Sequence[float] | None = None, chat_template: str | None = None) -> Generation:
        tgt, dps = self.chat_prompts(messages, chat_template)
        return self.generate(tgt, self.chat_params(params, chat_template), delta_prompts=dps, alphas=alphas)

    def chat_many(self, conversations: Sequence[list[dict]], params: SamplingParams, *,
                  alphas: Sequence[float] | None = None, chat_template: str | None = None, n_seq: int = 8,
                  on_done=None, each_alphas: Sequence[Sequence[float]] | None = None,
                  each_bias: Sequence[Sequence[tuple[int, float]]] | None = None) -> list[Generation]:
        """:meth:`chat` for many conversations, ``n_seq`` decoded side by side (:meth:`generate_many`)."""
        encoded = [self.encode(*self.chat_prompts(m, chat_template)) for m in conversations]
        return self.generate_many(encoded, self.chat_params(params, chat_template), alphas=alphas, n_seq=n_seq,
                                  on_done=on_done, each_alphas=each_alphas, each_bias=each_bias)

    def encode(self, prompt: str, delta_prompts: Sequence[str] | None = None) -> EncodedPrompt:
        """Tokenize ``prompt`` for the target and ``delta_prompts[i]`` (default: ``prompt``) for each
        delta. A :class:`~cmc_edge.prompt.Prompt` keeps its data parts plain text on both sides; a
        plain ``str`` is trusted markup. Reads only the vocabularies: safe beside a running generation."""
        delta_prompts = list(delta_prompts) if delta_prompts is not None else [prompt] * len(self.deltas)
        if len(delta_prompts) != len(self.deltas):
            raise InputError(f"{len(delta_prompts)} delta prompts given for {len(self.deltas)} deltas",
                             fix="give one delta prompt per delta")
        ptoks = self.target.tokenize(prompt)
        if not ptoks:
            raise InputError("the prompt is empty (no tokens)", fix="send some text")
        if len(ptoks) >= self.target.n_ctx:
            raise InputError(f"the prompt has {len(ptoks)} tokens but the context holds {self.target.n_ctx}",
                             fix="shorten the prompt or raise --n-ctx")
        try:
            dids = [d.encode(p) for d, p in zip(self.deltas, delta_prompts)]
        except CmcError:
            raise
        except Exception as exc:  # noqa: BLE001 - a delta's tokenizer failing is a delta fault
            raise DeltaFault(f"the delta's tokenizer failed on the prompt: {exc!r}",
                             fix="check the bundle with `cmc-edge inspect`") from exc
        return EncodedPrompt(ptoks, dids)

    # -- decoding ----------------------------------------------------------------------------
    def generate(self, prompt: str | EncodedPrompt, params: SamplingParams = SamplingParams(), *,
                 delta_prompts: Sequence[str] | None = None, alphas: Sequence[float] | None = None,
                 deadline: float | None = None, cancel: threading.Event | None = None,
                 whole: Sequence[bool] | None = None) -> Generation:
        """Complete ``prompt`` (target format; see :meth:`encode`). Each delta reads
        ``delta_prompts[i]`` (default: the same text) followed by the generated text. ``alphas``
        overrides the deltas' alphas. Past ``deadline`` (a ``time.monotonic()`` value) generation
        stops with :class:`GenerationTimeout`; once ``cancel`` is set it stops before the next token
        (finish reason "cancelled"). Errors are typed: :class:`TargetFault` (llama.cpp),
        :class:`DeltaFault` (a delta); either way no token sampled after the failure is emitted.

        ``whole[i]``: delta i must read the whole conversation (an enforced filter): its window
        never slides past the start of the prompt. A prompt longer than its window is an
        :class:`InputError`, and generation ends (finish reason "length") before a token would be
        sampled with the start out of its sight."""
        if whole is not None and len(whole) != len(self.deltas):
            raise InputError(f"{len(whole)} whole-view flags given for {len(self.deltas)} deltas",
                             fix="give one flag per delta")
        alphas = self._alphas(alphas)
        enc = prompt if isinstance(prompt, EncodedPrompt) else self.encode(prompt, delta_prompts)
        gen = Generation(prompt_tokens=len(enc.target))
        gen._it = self._run(enc, params, alphas, gen, deadline, cancel, whole or [False] * len(self.deltas))
        return gen

    def _run(self, enc: EncodedPrompt, params, alphas, gen: Generation, deadline=None, cancel=None,
             whole=()) -> Iterator[str]:
        import llama_cpp

        llm = self.target.llm
        t0 = time.perf_counter()
        for d, a, ids, w in zip(self.deltas, alphas, enc.deltas, whole):
            if w and a != 0.0 and len(ids) > d.session.max_positions:
                raise InputError(f"the prompt is {len(ids)} tokens long for delta {d.name!r}, which must read all "
                                 f"of it but reads at most {d.session.max_positions}",
                                 fix="shorten the prompt (the delta's own tokens count, not the model's)")
        active, trackers = self._start(enc.deltas, alphas)
        whole_active = [w for w, a in zip(whole, alphas) if a != 0.0]                # parallel to active
        pinned = [tr for tr, w in zip(trackers, whole_active) if w]
        sampler = None
        fut = None
        n_vocab = self.target.n_vocab
        bias = self._bias(params.logit_bias)
        try:
            with _blame(TargetFault, "llama.cpp failed on the prompt"):
                llm.reset()
                llm.eval(enc.target)
                llm.set_seed(params.seed if params.seed is not None else llm._seed)
                sampler = llm._init_sampler(top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                            temp=params.temperature, repeat_penalty=params.repeat_penalty)
            stream = TextStream(params.stop)
            gen_bytes = b""
            states = [tr.last_state for tr in trackers]
            top_k = sampler_top_k(params.temperature, params.top_k, params.repeat_penalty)
            stopped = False
            for step in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    gen.finish_reason = "cancelled"
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise GenerationTimeout(f"generation ran past its time limit after {len(gen.tokens)} tokens",
                                            fix="ask for fewer tokens, or allow more time "
                                                "(`cmc-edge serve --request-timeout`)")
                if llm.n_tokens >= self.target.n_ctx or any(tr.window_shifts for tr in pinned):
                    gen.finish_reason = "length"        # the context is full, or a filter's window is
                    break
                token = None
                if bias[0].size or active:
                    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
                    token = self._steer(np.ctypeslib.as_array(ptr, shape=(n_vocab,)), bias, active, states,
                                        top_k, step, gen)
                if token is None:
                    with _blame(TargetFault, f"llama.cpp's sampler failed at token {step}"):
                        token = sampler.sample(llm._ctx, -1)
                if self.target.is_eog(token):
                    gen.finish_reason = "stop"
                    break
                gen.tokens.append(token)
                gen_bytes += self.target.piece(token)
                fut = self._pool.submit(self._sync_all, trackers, gen_bytes) if (active and self._pool) else None
                with _blame(TargetFault, f"llama.cpp failed to evaluate token {step}"):
                    llm.eval([token])
                if active:
                    with _blame(DeltaFault, f"the delta step failed at token {step}"):
                        f, fut = fut, None
                        states = f.result() if f is not None else self._sync_all(trackers, gen_bytes)
                chunk, stopped = stream.push(self.target.piece(token))
                if chunk:
                    yield chunk
                if stopped:
                    gen.finish_reason = "stop"
                    break
            else:
                gen.finish_reason = "length"
            if not stopped:
                tail = stream.finish()
                if tail:
                    yield tail
        except CmcError:
            gen.finish_reason = "error"
            raise
        finally:
            if fut is not None:              # the delta's step is still running: let it finish before
                wait([fut])                   # its session is reset by the next generation
            gen.seconds = time.perf_counter() - t0
            gen.resyncs = sum(tr.resyncs for tr in trackers)
            if sampler is not None:
                sampler.close()

    def generate_many(self, prompts: Sequence[str | EncodedPrompt], params: SamplingParams = SamplingParams(
                          temperature=0.0), *, alphas: Sequence[float] | None = None, n_seq: int = 8,
                      on_done=None, each_alphas: Sequence[Sequence[float]] | None = None,
                      each_bias: Sequence[Sequence[tuple[int, float]]] | None = None) -> list[Generation]:
        """Greedy completions of many prompts, ``n_seq`` of them decoded side by side in one llama.cpp
        batch (:class:`~cmc_edge.runtime.target.SeqBatch`), each with its own delta caches: the
        tokens :meth:`generate` picks one prompt at a time (up to llama.cpp's batched arithmetic),
        1.2-2x faster on 2 cores for short answers. For evaluation and data building, not
        serving: greedy only, no deadline. ``on_done(i, generation)`` is called as each prompt
        finishes. ``each_alphas`` gives each prompt its own strengths (one per delta) instead of
        ``alphas``, ``each_bias`` its own logit bias instead of ``params.logit_bias``.

        The same prompt given several times (at other strengths, with other biases) is decoded in
        one sequence, one after another: its prompt is evaluated once (the cache keeps it), and
        the target's logits after every prefix an earlier answer to it went through are kept, so
        a later answer is decoded by llama.cpp only from where it first chooses another token
        (Generation.replayed counts the steps it did not). The bias and the deltas' shifts are
        applied to the kept logits as to new ones, so every answer is the one it gets alone. A
        failure of llama.cpp or of a delta stops them all (typed as in :meth:`generate`)."""
        if sampler_top_k(params.temperature, params.top_k, params.repeat_penalty) != 1:
            raise InputError("generate_many decodes greedily only",
                             fix="use temperature 0 and no repeat penalty, or generate() one prompt at a time")
        for name, given in (("alphas", each_alphas), ("logit biases", each_bias)):
            if given is not None and len(given) != len(prompts):
                raise InputError(f"{len(given)} sets of {name} for {len(prompts)} prompts",
                                 fix=f"give one set of {name} per prompt")
        per = ([self._alphas(a) for a in each_alphas] if each_alphas is not None
               else [self._alphas(alphas)] * len(prompts))
        biases = ([self._bias(b) for b in each_bias] if each_bias is not None
                  else [self._bias(params.logit_bias)] * len(prompts))
        encs = [p if isinstance(p, EncodedPrompt) else self.encode(p) for p in prompts]
        gens = [Generation(_it=iter(()), prompt_tokens=len(e.target)) for e in encs]
        batch = self.target.seq_batch(max(1, min(n_seq, len(encs))))
        n_ctx = batch.n_ctx_seq
        for e in encs:
            if len(e.target) >= n_ctx:
                raise InputError(f"a prompt has {len(e.target)} tokens but the context holds {n_ctx}",
                                 fix="shorten the prompt or raise --n-ctx")
        used = [d for k, d in enumerate(self.deltas) if any(a[k] != 0.0 for a in per)]
        with _blame(DeltaFault, "the delta failed to make a cache per sequence"):
            caches = [{id(d): d.session.fork() for d in used} for _ in range(batch.n_seq)]
        slots: dict[int, dict] = {}
        # Prompts with the same tokens form a group that one sequence decodes, one after another.
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(encs):
            groups.setdefault(tuple(e.target), []).append(i)
        todo = [g[::-1] for g in groups.values()][::-1]        # pop() gives the next group, then its next item
        mine: dict[int, list[int]] = {}                        # sequence -> the rest of its group
        # sequence -> {tokens generated so far: the target's raw logits after them}, while its group
        # has answers to come
        kept: dict[int, dict[tuple, np.ndarray]] = {}

        def start(seq: int) -> None:
            if not mine.get(seq):
                mine[seq] = todo.pop()
                kept[seq] = {}
            i = mine[seq].pop()
            active = [(d, a, p) for d, a, p in zip(self.deltas, per[i], encs[i].deltas) if a != 0.0]
            with _blame(DeltaFault, "the delta failed on the prompt"):
                trackers = [d.tracker(p, session=caches[seq][id(d)]) for d, _, p in active]
            slots[seq] = {"i": i, "active": active, "trackers": trackers,
                          "states": [tr.last_state for tr in trackers], "bytes": b"",
                          "stream": TextStream(params.stop), "t0": time.perf_counter()}

        def finish(seq: int, reason: str) -> None:
            st = slots.pop(seq)
            gen = gens[st["i"]]
            if reason != "stop-string":
                gen.text += st["stream"].finish()
            gen.finish_reason = "stop" if reason == "stop-string" else reason
            gen.seconds = time.perf_counter() - st["t0"]
            gen.resyncs = sum(tr.resyncs for tr in st["trackers"])
            if on_done is not None:
                on_done(st["i"], gen)

        def step(seq: int, logits: np.ndarray) -> None:
            """One token for sequence ``seq`` from the target's logits after what it has so far."""
            st = slots[seq]
            i = st["i"]
            gen = gens[i]
            if len(encs[i].target) + len(gen.tokens) >= n_ctx:
                finish(seq, "length")
                return
            token = self._steer(logits, biases[i], st["active"], st["states"], 1, len(gen.tokens), gen)
            token = int(np.argmax(logits)) if token is None else token
            if self.target.is_eog(token):
                finish(seq, "stop")
                return
            gen.tokens.append(token)
            piece = self.target.piece(token)
            st["bytes"] += piece
            chunk, stopped = st["stream"].push(piece)
            gen.text += chunk
            if stopped or len(gen.tokens) >= params.max_tokens:
                finish(seq, "stop-string" if stopped else "length")
                return
            if st["active"]:
                with _blame(DeltaFault, f"the delta step failed at token {len(gen.tokens) - 1}"):
                    st["states"] = self._sync_all(st["trackers"], st["bytes"])

        try:
            while todo or slots or any(mine.values()):
                feed: dict[int, list[int]] = {}                 # sequence -> tokens to evaluate
                for seq in range(batch.n_seq):
                    # Steps whose logits an earlier answer to the same prompt already has cost no decode.
                    while seq in slots or todo or mine.get(seq):
                        if seq not in slots:
                            start(seq)
                        st = slots[seq]
                        gen = gens[st["i"]]
                        # (only a group with answers to come keeps logits: no key built otherwise)
                        known = kept[seq].get(tuple(gen.tokens)) if kept[seq] else None
                        if known is None:
                            # After a decoded step the cache holds all but the last token; else it
                            # keeps what it shares with this answer's tokens and evaluates the rest.
                            feed[seq] = ([gen.tokens[-1]] if st.get("decoded") and gen.tokens
                                         else batch.begin(seq, encs[st["i"]].target + gen.tokens))
                            break
                        gen.replayed += 1
                        st["decoded"] = False
                        step(seq, known.copy())
                if not feed:
                    continue
                with _blame(TargetFault, "llama.cpp failed on a batch of sequences"):
                    rows = batch.decode(feed)
                for seq in feed:
                    if mine.get(seq):                          # its group has answers to come
                        kept[seq][tuple(gens[slots[seq]["i"]].tokens)] = rows[seq].copy()
                    slots[seq]["decoded"] = True
                    step(seq, rows[seq])
        except CmcError:
            for st in slots.values():
                gens[st["i"]].finish_reason = "error"
            raise
        return gens

    def _alphas(self, alphas: Sequence[float] | None) -> list[float]:
        """One checked alpha per delta: ``alphas`` where given, else each delta's own."""
        if alphas is not None and len(alphas) != len(self.deltas):
            raise InputError(f"{len(alphas)} alphas given for {len(self.deltas)} deltas",
                             fix="give one alpha per delta")
        return [check_alpha(a) for a in (alphas if alphas is not None else [d.alpha for d in self.deltas])]

    def _bias(self, logit_bias: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
        """``(token id, bias)`` pairs (a SamplingParams' ``logit_bias``) as (token ids, biases)
        arrays, checked against the vocabulary."""
        ids = np.array([t for t, _ in logit_bias], dtype=np.int64)
        vals = np.array([b for _, b in logit_bias], dtype=np.float32)
        if ids.size and ids.max() >= self.target.n_vocab:
            raise InputError(f"logit_bias names token {int(ids.max())}; the model has {self.target.n_vocab}",
                             fix="use token ids of this model's vocabulary")
        return ids, vals

    def _steer(self, logits: np.ndarray, bias, active, states, top_k: int | None, step: int,
               gen: Generation) -> int | None:
        """One step's scores, changed in place: the blocklist's bias first (a banned token stays banned
        whatever the shift), then every active delta's mapped shift. Greedy decoding takes the token
        from the shift's exact best candidate without a pass over the vocabulary: it is returned.
        Otherwise None: the caller samples from ``logits``, which then hold the shift."""
        ids, vals = bias
        if ids.size:
            logits[ids] += vals
        if not active:
            return None
        with _blame(DeltaFault, f"the delta shift failed at token {step}"):
            for (d, _, _), h in zip(active, states):
                if not np.isfinite(h.sum(dtype=np.float64)):
                    raise DeltaFault(f"delta {d.name} produced non-finite logits at token {step}",
                                     fix="re-export the bundle; check it with `cmc-edge inspect`")
            parts = [(d.mapped, h, a) for (d, a, _), h in zip(active, states)]
            token = shifted_argmax(logits, parts) if top_k == 1 else None
            if token is None and not add_shift_(logits, parts, k=None if top_k == 1 else top_k):
                gen.full_shift_steps += 1
        return token

    def _start(self, delta_ids, alphas):
        """The deltas with a non-zero alpha, each with a tracker that has read its prompt."""
        active = [(d, a, p) for d, a, p in zip(self.deltas, alphas, delta_ids) if a != 0.0]
        with _blame(DeltaFault, "the delta failed on the prompt"):
            return active, [d.tracker(p) for d, _, p in active]

    def score_reply(self, messages: list[dict], reply: str, *, alphas: Sequence[float] | None = None) -> np.ndarray:
        """Teacher-forced negative log-likelihood (nats) of each token of ``reply`` as the assistant's
        answer to ``messages``, under the combined model: the judge-free measure of how much a delta
        moves an LLM towards reference answers. Shape (number of reply tokens,)."""
        tgt, dps = self.chat_prompts(messages)
        rtoks = self.target.tokenize(reply, add_bos=False)
        ptoks = self.target.tokenize(tgt)
        if not rtoks:
            raise InputError("the reference reply is empty", fix="give a non-empty reference answer")
        if len(ptoks) + len(rtoks) > self.target.n_ctx:
            raise InputError(f"prompt and reply need {len(ptoks) + len(rtoks)} tokens; the context holds "
                             f"{self.target.n_ctx}", fix="shorten them or raise --n-ctx")
        return self._forced_nll(ptoks, rtoks, dps, alphas)

    def score_text(self, text: str, *, alphas: Sequence[float] | None = None,
                   max_tokens: int | None = None) -> np.ndarray:
        """Teacher-forced negative log-likelihood (nats) of each token of plain ``text`` (no chat
        format) under the combined model, from its second token on (its first real token, after
        any BOS, is the prompt; each delta reads that token's text, then the text scored so far).
        At most ``max_tokens`` tokens of the text are read (default: as many as the context holds).
        Its mean, exponentiated, is the perplexity. Shape (number of tokens scored,)."""
        toks = self.target.tokenize(text)
        toks = toks[: min(max_tokens or self.target.n_ctx, self.target.n_ctx)]
        first = 1 if toks and self.target.piece(toks[0]) == b"" else 0                # skip BOS
        if len(toks) < first + 2:
            raise InputError("the text has fewer than two tokens to score", fix="give a longer text")
        prompt = self.target.piece(toks[first]).decode("utf-8", errors="replace")
        return self._forced_nll(toks[: first + 1], toks[first + 1:], [prompt] * len(self.deltas), alphas)

    def _forced_nll(self, ptoks: list[int], rtoks: list[int], delta_prompts: Sequence[str],
                    alphas: Sequence[float] | None) -> np.ndarray:
        """NLL (nats) of each of ``rtoks`` following ``ptoks``: llama.cpp reads them in batches
        (:meth:`TargetLLM.eval_logits`), each delta reads its prompt and then the text of the
        tokens before the one scored, and each row gets the full shift. (len(rtoks),)"""
        alphas = self._alphas(alphas)
        active, trackers = self._start(delta_prompts, alphas)
        llm = self.target.llm
        llm.reset()
        llm.eval(ptoks)
        rows = itertools.chain([self.target.last_logits()], self.target.eval_logits(rtoks[:-1]))
        states = [tr.last_state for tr in trackers]
        nll, gen_bytes = np.empty(len(rtoks), np.float64), b""
        for i, (token, logits) in enumerate(zip(rtoks, rows)):
            add_shift_(logits, [(d.mapped, h, a) for (d, a, _), h in zip(active, states)], k=None)
            nll[i] = -log_softmax_np(logits)[token]
            gen_bytes += self.target.piece(token)
            if i + 1 < len(rtoks):
                states = self._sync_all(trackers, gen_bytes)
        if not np.isfinite(nll).all():
            raise DeltaFault("non-finite log-likelihood while scoring a text", fix="check the delta bundle")
        return nll

    @staticmethod
    def _sync_all(trackers, gen_bytes: bytes) -> list[np.ndarray]:
        return [tr.state_for(gen_bytes) for tr in trackers]

    def close(self) -> None:
        """Wait for the delta worker thread and free llama.cpp's model; the engine is unusable after."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close = getattr(self.target, "close", None)
        if close is not None:
            close()


def parse_delta_spec(spec: str | Path) -> tuple[str | None, Path]:
    """``"NAME=PATH"`` names a delta; a bare path is named after its directory.

    >>> parse_delta_spec("json=runs/a/bundle"), parse_delta_spec("runs/filter")
    (('json', PosixPath('runs/a/bundle')), (None, PosixPath('runs/filter')))
    """
    text = str(spec)
    name, sep, path = text.partition("=")
    if sep and name and not Path(text).exists() and all(c.isalnum() or c in "-_." for c in name):
        return name, Path(path)
    return None, Path(text)


def build_engine(model: str | Path, deltas: Sequence[str | Path] = (), *, alphas: Sequence[float] | None = None,
                 n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0,
                 variant: str | None = None) -> Engine:
    """An engine for a GGUF (path or packaged name: smollm2, gemma3) and delta bundles (``PATH`` or
    ``NAME=PATH``), each at ``alphas[i]`` (default: the bundle's own). Delta names must be unique."""
    from cmc_edge.models import resolve_model
    from cmc_edge.runtime.target import TargetLLM

    if alphas and len(alphas) != len(deltas):
        raise InputError(f"{len(alphas)} --alpha values for {len(deltas)} --delta bundles",
                         fix="give one --alpha per --delta, in the same order")
    specs = [parse_delta_spec(d) for d in deltas]
    names = [name or path.resolve().name for name, path in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two deltas are both named {dup[0]!r} (a delta is named after its directory)",
                         fix="name them: --delta NAME=PATH")
    target = TargetLLM(resolve_model(model), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, seed=seed)
    try:
        loaded = [Delta(path, target, alpha=alphas[i] if alphas else None, variant=variant, name=names[i])
                  for i, (_, path) in enumerate(specs)]
    except BaseException:
        target.close()
        raise
    return Engine(target, loaded)
