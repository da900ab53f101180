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
        """Free llama.cpp's model and context now (not at garbage collection)."""
        self.llm.close()

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
