"""The target LLM: a GGUF run by llama-cpp-python, plus the vocabulary helpers CMC needs."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cmc_edge.errors import InputError
from cmc_edge.prompt import QA_STOP, QA_TEMPLATE, Prompt, PromptFormat, prompt_fragments

log = logging.getLogger(__name__)


def check_gguf(path: str | Path) -> Path:
    """Fail early, with a fix, on a missing, truncated or non-GGUF file (llama.cpp would only crash)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a GGUF model file", fix="pass the path of the .gguf file in it")
    if not path.is_file():
        raise InputError(f"model file {path} not found", fix="pass the path of a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise InputError(f"{path} is not a GGUF file (it does not start with the GGUF magic)",
                         fix="pass a llama.cpp .gguf model; convert other formats with llama.cpp's convert scripts")
    return path


class TargetLLM:
    """Owns a ``llama_cpp.Llama``; exposes raw token pieces, end-of-generation ids and a chat format."""

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = 0, verbose: bool = False):
        from llama_cpp import Llama

        self.path = check_gguf(model_path)
        try:
            self.llm = Llama(str(self.path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                             seed=seed, verbose=verbose)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"llama.cpp could not load {self.path}: {exc}",
                             fix="check that the file is a complete GGUF model (re-download or re-assemble it)") from exc
        import llama_cpp

        self._lib = llama_cpp
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self.llm.n_ctx()
        self._pieces: dict[int, bytes] = {}
        self._control: dict[str, int] | None = None
        self._batches: dict[tuple[int, int], "SeqBatch"] = {}
        self.metadata = dict(self.llm.metadata)

    # -- vocabulary --------------------------------------------------------------------------
    def piece(self, token: int) -> bytes:
        """The bytes a token contributes to the text (control tokens contribute nothing)."""
        got = self._pieces.get(token)
        if got is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
                if n >= 0:
                    got = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = got
        return got

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. A :class:`~cmc_edge.prompt.Prompt` parses special tokens only in its
        markup parts (its data parts are plain text, whatever they contain); a plain ``str`` parses
        them everywhere (trusted text, e.g. a hand-written template) unless ``special=False``."""
        if add_bos is None:
            add_bos = bool(self._lib.llama_vocab_get_add_bos(self.vocab))
        if not special or not isinstance(text, Prompt):
            return self._tokenize(text, add_bos, special)
        ids = [self._lib.llama_vocab_bos(self.vocab)] if add_bos else []
        for frag in prompt_fragments(text, self.control_tokens()):
            ids.extend(self._tokenize(frag, False, False) if isinstance(frag, str) else [frag])
        return ids

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        try:                      # lone surrogates: bytes that were not UTF-8 in argv, or "\udcff" in JSON
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"the text is not valid UTF-8: {exc.reason} at character {exc.start} "
                             f"({text[exc.start:exc.end]!r})", fix="pass UTF-8 text; re-encode the input as UTF-8") from exc
        return self.llm.tokenize(data, add_bos=add_bos, special=special)

    def control_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens llama.cpp parses only when told to (control and unknown tokens:
        ``<|im_end|>``, ``<end_of_turn>``). Its user-defined tokens are ordinary text to it. Read
        from the vocabulary once (a few hundred ms for 256k tokens)."""
        if self._control is None:
            lib = self._lib
            mask = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
            found = {}
            for t in range(self.n_vocab):
                if lib.llama_vocab_get_attr(self.vocab, t) & mask:
                    text = lib.llama_vocab_get_text(self.vocab, t).decode("utf-8", errors="replace")
                    if text:
                        found.setdefault(text, t)
            self._control = found
        return self._control

    def close(self) -> None:
        """Free llama.cpp's model and contexts now (not at garbage collection)."""
        for b in self._batches.values():
            b.close()
        self._batches.clear()
        self.llm.close()

    def seq_batch(self, n_seq: int, n_ctx_seq: int | None = None) -> "SeqBatch":
        """A second llama.cpp context on the same weights that holds ``n_seq`` sequences of up to
        ``n_ctx_seq`` tokens each (default: this model's context), made once and kept."""
        key = (n_seq, n_ctx_seq or self.n_ctx)
        if key not in self._batches:
            self._batches[key] = SeqBatch(self, *key)
        return self._batches[key]

    # -- logits ------------------------------------------------------------------------------
    def last_logits(self) -> np.ndarray:
        """A copy of the logits after the last token evaluated. (V,) float32"""
        ptr = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval_logits(self, tokens: Sequence[int], *, chunk: int = 32) -> Iterator[np.ndarray]:
        """Evaluate ``tokens`` after what the context already holds, yielding the logits after
        each one in turn ((V,) float32 copies; lazily: a chunk is evaluated when its rows are read).

        ``Llama.eval`` keeps only the last position's logits, unless the model was loaded with
        ``logits_all``, which holds an n_ctx x V array for the whole life of the model (1 GiB for a
        262k vocabulary at n_ctx 1024). Here each batch of ``chunk`` tokens asks llama.cpp for an
        output row at every position, so its output buffer holds ``chunk`` rows and the tokens are
        still evaluated in batches, not one by one."""
        llm = self.llm
        step = max(1, min(chunk, llm.n_batch))
        for s in range(0, len(tokens), step):
            part = [int(t) for t in tokens[s:s + step]]
            n_past = llm.n_tokens
            if n_past + len(part) > self.n_ctx:
                raise InputError(f"the text needs {n_past + len(part)} tokens; the context holds {self.n_ctx}",
                                 fix="shorten the text or raise --n-ctx")
            llm._ctx.kv_cache_seq_rm(-1, n_past, -1)          # as Llama.eval: nothing stale past n_past
            llm._batch.set_batch(batch=part, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past:n_past + len(part)] = part
            llm.n_tokens += len(part)
            ptr = self._lib.llama_get_logits(llm._ctx.ctx)                              # one row per output
            yield from np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy()

    # -- chat --------------------------------------------------------------------------------
    def prompt_format(self, override: str | None = None) -> PromptFormat:
        """The GGUF's own chat template; else (base models) a one-line Question/Answer layout."""
        if override:
            return PromptFormat(chat_template=override)
        tmpl = self.metadata.get("tokenizer.chat_template")
        if tmpl:
            return PromptFormat(chat_template=tmpl)
        if not getattr(self, "_qa_logged", False):
            self._qa_logged = True
            log.info("%s has no chat template; using the Question/Answer layout for base models", self.path.name)
        return PromptFormat(chat_template=QA_TEMPLATE, stop=QA_STOP)


class SeqBatch:
    """Many sequences decoded side by side: one llama.cpp context (on the target's weights) whose
    KV cache holds ``n_seq`` sequences, each in its own stream; the new tokens of all of them go
    into one ``llama_decode``.

    On 2 CPU cores a decode of 8 tokens cost about 2.9x one of 1 token with llama.cpp's AVX2
    kernels (SmolLM2: 79 -> 222 tokens/s; Gemma 3: 54 -> 177); with its AVX-512 kernels SmolLM2's
    Q4_1 costs ~9 ms a token from 4 side by side on (1: 12.8 ms, 8: 73.5 ms), so what saves time
    there is evaluating fewer tokens. A sequence given a new prompt keeps the part its cache shares
    with it (the chat layout's system turn and lead-in), so only the rest is evaluated. Each
    sequence sees only its own tokens; the logits are llama.cpp's batched arithmetic, which may
    differ from a one-token decode in the last bits.
    """

    def __init__(self, target: TargetLLM, n_seq: int, n_ctx_seq: int):
        from llama_cpp import _internals

        if n_seq < 1 or n_ctx_seq < 1:
            raise InputError(f"a batch needs >= 1 sequence of >= 1 token, got {n_seq} x {n_ctx_seq}",
                             fix="e.g. 8 sequences")
        lib = target._lib
        src = target.llm.context_params
        params = type(src).from_buffer_copy(src)
        params.n_ctx = n_seq * n_ctx_seq
        params.n_seq_max = n_seq
        # A cache per sequence: attention reads only its own cells. (One unified cache for all
        # made every decode attend over all of them: slower, and answers drifted from one-by-one.)
        params.kv_unified = False
        params.n_batch = params.n_ubatch = 512
        self.target, self.n_seq, self.n_ctx_seq, self.n_batch = target, n_seq, n_ctx_seq, 512
        self._lib = lib
        try:
            self._ctx = _internals.LlamaContext(model=target.llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise InputError(f"llama.cpp could not make a context for {n_seq} sequences of {n_ctx_seq} tokens: {exc}",
                             fix="use fewer sequences side by side") from exc
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(n_seq)]        # the tokens each sequence's cache holds
        self._closed = False

    def begin(self, seq: int, prompt: Sequence[int]) -> list[int]:
        """Start sequence ``seq`` on ``prompt``: keep the cached tokens it begins with, drop the
        rest; return the tokens still to evaluate (never none: the last one gives the logits)."""
        if not prompt or len(prompt) > self.n_ctx_seq:
            raise InputError(f"a prompt of {len(prompt)} tokens for sequences of {self.n_ctx_seq}",
                             fix="shorten the prompt or raise the context")
        held, keep = self.held[seq], 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            keep += 1
        if keep < len(held) and not self._lib.llama_memory_seq_rm(self._ctx.memory, seq, keep, -1):
            self._lib.llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)    # no partial removal here: start over
            keep = 0
        self.held[seq] = list(prompt[:keep])
        return list(prompt[keep:])

    def decode(self, parts: dict[int, Sequence[int]]) -> dict[int, np.ndarray]:
        """Evaluate ``tokens`` after what sequence ``seq`` holds, for each ``{seq: tokens}``; return
        the logits after each part's last token, ``{seq: (V,) float32 copy}``. Parts are packed
        into decodes of at most ``n_batch`` tokens."""
        for seq, toks in parts.items():
            if not toks or len(self.held[seq]) + len(toks) > self.n_ctx_seq:
                raise InputError(f"sequence {seq} needs {len(self.held[seq]) + len(toks)} tokens; it holds "
                                 f"{self.n_ctx_seq}", fix="shorten the prompt or raise the context")
        flat = [(seq, len(self.held[seq]) + k, int(t), k == len(toks) - 1)
                for seq, toks in parts.items() for k, t in enumerate(toks)]
        out: dict[int, np.ndarray] = {}
        b, V = self._batch, self.target.n_vocab
        for s in range(0, len(flat), self.n_batch):
            chunk = flat[s:s + self.n_batch]
            for i, (seq, pos, tok, last) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, last
                b.seq_id[i][0] = seq
            b.n_tokens = len(chunk)
            rc = self._lib.llama_decode(self._ctx.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (seq, _, tok, last) in enumerate(chunk):
                self.held[seq].append(tok)
                if last:
                    ptr = self._lib.llama_get_logits_ith(self._ctx.ctx, i)
                    out[seq] = np.ctypeslib.as_array(ptr, shape=(V,)).copy()
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lib.llama_batch_free(self._batch)
            self._ctx.close()
