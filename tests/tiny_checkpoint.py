"""Write a tiny delta training checkpoint (as the training stage does) for export and runtime tests.

The delta is ``build_delta(DeltaConfig.preset("tiny", V))`` with a *random* final norm, so its
logits are non-trivial (a freshly built delta has all-zero logits, which would make every
ONNX-vs-PyTorch comparison pass vacuously). The tokenizer is a byte-level BPE trained on a few
sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "A tiny delta model steers a large language model.",
    "Hello world! 1234 5678 héllo wörld ∑ 日本",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (256 byte tokens + a few merges + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")


def make_tiny_checkpoint(path: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a checkpoint directory at ``path`` (config.json, model.safetensors, tokenizer, cmc.json)."""
    import torch

    from cmc_edge.train.model import DeltaConfig, build_delta

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tok = make_tiny_tokenizer()
    vocab = len(hf_tok)
    cfg = DeltaConfig.preset(preset, vocab_size=vocab, max_positions=128)
    model = build_delta(cfg, seed=seed)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model.model.norm.weight.copy_(1.0 + 0.5 * torch.randn_like(model.model.norm.weight))
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    meta = {
        "format": "cmc-edge-checkpoint",
        "format_version": 1,
        "alpha": 1.5,
        "objective": "sft",
        "template": {"source": "tests/tiny", "name": "tiny-template", "vocab_size": vocab,
                     "vocab_hash": "tiny-template-vocab"},
        "prompt_format": {"chat_template": None, "system_prompt": None, "add_bos": False, "end_of_turn": ""},
        "delta_config": cfg.to_dict(),
        "train_config": {"seed": seed, "steps": 0},
    }
    (path / "cmc.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def make_tiny_bundle(path: str | Path, seed: int = 0, **export_kw) -> Path:
    """Export a fresh tiny checkpoint to a bundle at ``path`` (the checkpoint goes beside it)."""
    from cmc_edge.export import export_bundle

    path = Path(path)
    ckpt = make_tiny_checkpoint(path.with_name(path.name + ".ckpt"), seed=seed)
    return export_bundle(ckpt, path, **export_kw)
