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


def load_template(source: str | Path, device: str = "cpu") -> Template:
    """``source``: a ``.gguf`` file, a packaged model name (``smollm2``), or an HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmc_edge.models import resolve_model
    from cmc_edge.tokenmap import read_gguf_vocab, read_tokenizer_json

    path = resolve_model(source)
    log.info("loading template from %s", path)
    try:
        if path.is_file():
            with open(path, "rb") as fh:
                magic = fh.read(4)
            if magic != b"GGUF":
                raise InputError(f"{path} is not a GGUF file (bad magic)",
                                 fix="pass a .gguf model file or an HF model directory")
            kw = {"gguf_file": path.name}
            tok = AutoTokenizer.from_pretrained(path.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
            vocab_hash = read_gguf_vocab(path).hash
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
    name = getattr(model.config, "_name_or_path", "") or path.stem
    return Template(model=model, tokenizer=tok, prompt_format=fmt, name=str(name), source=str(path),
                    vocab_size=int(model.config.vocab_size), vocab_hash=vocab_hash)
