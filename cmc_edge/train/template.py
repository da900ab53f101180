"""Load the frozen template LLM (torch) from a GGUF file (dequantized by transformers) or an HF directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cmc_edge.errors import InputError
from cmc_edge.prompt import PromptFormat

log = logging.getLogger(__name__)


@dataclass
class Template:
    model: object            # transformers causal LM, eval mode, requires_grad False
    tokenizer: object        # transformers tokenizer (saved into the delta checkpoint)
    prompt_format: PromptFormat
    name: str
    source: str
    vocab_size: int
    vocab_hash: str

    def describe(self) -> dict:
        return {"source": self.source, "name": self.name, "vocab_size": self.vocab_size,
                "vocab_hash": self.vocab_hash}


def _model_name(model, path: Path) -> str:
    """The name a template goes by in checkpoints: its config's, else the file's stem."""
    return getattr(model.config, "_name_or_path", "") or path.stem


def _converted_dir(path: Path) -> Path:
    """Where the template converted from the GGUF at ``path`` is kept: the file's SHA-256 and the
    transformers version (a new converter may dequantize differently)."""
    import transformers

    from cmc_edge.models import cache_dir, model_digest

    digest = model_digest(path)
    return cache_dir() / "templates" / f"{digest[:24]}-tf{transformers.__version__}"


def _load_converted(conv: Path):
    """(tokenizer, model, meta) from a converted template, or None if it is missing or unreadable."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta_path = conv / "cmc-template.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        meta = {k: str(meta[k]) for k in ("name", "vocab_hash")}
        tok = AutoTokenizer.from_pretrained(conv)
        model = AutoModelForCausalLM.from_pretrained(conv, dtype=torch.float32)
    except Exception as exc:        # a damaged copy is never used; the GGUF is converted again
        log.warning("ignoring the converted template in %s (%s); converting the GGUF again", conv, exc)
        return None
    return tok, model, meta


def _save_converted(conv: Path, tok, model, meta: dict) -> None:
    """Keep the converted template for the next run (best effort: a failure costs only time)."""
    import json

    from cmc_edge.artifacts import atomic_dir

    from safetensors.torch import save_model

    try:
        with atomic_dir(conv, overwrite=True) as tmp:
            # transformers flags a GGUF-loaded model as quantized and will not save it; its weights are
            # plain fp32 by now, so they are written directly, with the config minus the GGUF marker.
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(tmp)
            (tmp / "cmc-template.json").write_text(json.dumps(meta, indent=1) + "\n")
        log.info("kept the converted template in %s (next runs skip the GGUF conversion)", conv)
    except Exception as exc:        # best effort: any failure here costs only the next run's time
        log.warning("could not keep the converted template in %s: %s", conv, exc)


def load_template(source: str | Path, device: str = "cpu", *, keep_converted: bool = True) -> Template:
    """``source``: a ``.gguf`` file, a packaged model name (``smollm2``), or an HF model directory.

    A GGUF is dequantized by transformers (about 30-50 s for SmolLM2 on 2 cores, most of it parsing
    the file three times); with ``keep_converted`` the result is kept as an HF directory under the
    cache (``$CMC_EDGE_HOME/templates``, fp32: 4 bytes per parameter) and later runs load that in
    seconds. The weights are the same either way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmc_edge.models import resolve_model
    from cmc_edge.tokenmap import read_gguf_vocab, read_tokenizer_json

    path = resolve_model(source)
    log.info("loading template from %s", path)
    name = None
    try:
        if path.is_file():
            with open(path, "rb") as fh:
                magic = fh.read(4)
            if magic != b"GGUF":
                raise InputError(f"{path} is not a GGUF file (bad magic)",
                                 fix="pass a .gguf model file or an HF model directory")
            conv = _converted_dir(path) if keep_converted else None
            got = _load_converted(conv) if conv else None
            if got:
                tok, model, meta = got
                name, vocab_hash = meta["name"], meta["vocab_hash"]
            else:
                kw = {"gguf_file": path.name}
                tok = AutoTokenizer.from_pretrained(path.parent, **kw)
                model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
                vocab_hash = read_gguf_vocab(path).hash
                name = _model_name(model, path)
                if conv:
                    _save_converted(conv, tok, model, {"source": str(path), "name": str(name),
                                                       "vocab_hash": vocab_hash})
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tj = path / "tokenizer.json"
            if not tj.is_file():
                raise InputError(f"{path} has no tokenizer.json",
                                 fix="save the template with a fast tokenizer (tokenizer.save_pretrained)")
            vocab_hash = read_tokenizer_json(tj).hash
        else:
            raise InputError(f"template {path} is neither a file nor a directory",
                             fix="pass a .gguf file or an HF model directory")
    except (OSError, ValueError) as exc:
        raise InputError(f"could not load the template from {path}: {exc}",
                         fix="pass a complete, valid .gguf file or HF model directory") from exc
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    eot = tok.eos_token or ""
    fmt = PromptFormat(chat_template=getattr(tok, "chat_template", None), system_prompt=None,
                       end_of_turn=eot)
    name = name or _model_name(model, path)
    return Template(model=model, tokenizer=tok, prompt_format=fmt, name=str(name), source=str(path),
                    vocab_size=int(model.config.vocab_size), vocab_hash=vocab_hash)


def greedy_answers(tpl: Template, prompts, max_tokens: int, *, batch_size: int = 96, progress=None) -> list[str]:
    """The template's own greedy answers to ``prompts`` (each a user turn), up to ``max_tokens``
    tokens or its end of turn: the recipes' training data. The same weights and layout the trainer
    scores them with (torch, float32), many prompts per batch, left-padded and sorted by length:
    about 2x faster on 2 CPU cores than answering them with llama.cpp (BENCHMARKS.md), whose
    quantized arithmetic can break a near tie the other way. A decoding step reads every weight
    for a few rows each, so larger batches pay off: 96 a batch answers SmolLM2's prompts 1.2x
    faster than 32 (BENCHMARKS.md). ``progress(n)`` is called after each batch with the number
    of prompts answered in it."""
    import torch

    from cmc_edge.prompt import render_prompt

    tok, model = tpl.tokenizer, tpl.model
    ends = {tok.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None}
    if not ends:
        raise InputError(f"the template {tpl.name} names no end-of-turn token",
                         fix="use a chat model whose tokenizer sets eos_token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(ends)
    ids = [tok(render_prompt(tpl.prompt_format, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    out: list[str] = [""] * len(ids)
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        width = max(len(ids[k]) for k in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, k in enumerate(chunk):
            x[row, width - len(ids[k]):] = torch.tensor(ids[k])
            mask[row, width - len(ids[k]):] = 1
        with torch.inference_mode():
            got = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), max_new_tokens=max_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=sorted(ends), pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
        for row, k in enumerate(chunk):
            new = got[row, width:].tolist()
            cut = next((i for i, t in enumerate(new) if t in ends), len(new))
            out[k] = tok.decode(new[:cut], skip_special_tokens=True)
        if progress is not None:
            progress(len(chunk))
    return out


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
