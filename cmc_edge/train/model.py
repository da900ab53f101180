"""The delta model: a small Llama-architecture causal LM over the template's vocabulary.

It is a plain ``transformers.LlamaForCausalLM`` (so the checkpoint is an ordinary HF directory)
with tied input/output embeddings. It starts as an exact no-op: the final RMSNorm weight is
zero, so every logit is 0 and ``log_softmax(template) + alpha * 0`` is the template itself.
Gradients still reach that weight (d logit / d g = normalised hidden * embedding), so it
leaves zero on the first step, like LoRA's zero-initialised B matrix.

>>> cfg = DeltaConfig.preset("15m", vocab_size=49152)
>>> (cfg.hidden_size, cfg.num_layers)
(256, 4)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from cmc_edge.errors import InputError

Preset = Literal["tiny", "15m", "42m", "110m"]

# (hidden, layers, heads, intermediate); "tiny" is for tests only.
_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),
    "15m": (256, 4, 4, 768),
    "42m": (512, 5, 8, 1536),
    "110m": (768, 10, 12, 2048),
}


@dataclass(frozen=True)
class DeltaConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 1024
    rope_theta: float = 10000.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.vocab_size < 2:
            raise InputError(f"delta vocab_size must be >= 2, got {self.vocab_size}",
                             fix="build the delta over the template's tokenizer")
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
                             fix="pick a preset or a hidden size that is a multiple of the head count")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "DeltaConfig":
        if name not in _PRESETS:
            raise InputError(f"unknown delta size preset {name!r}", fix=f"use one of {sorted(_PRESETS)}")
        h, n, heads, inter = _PRESETS[name]
        return cls(vocab_size=vocab_size, hidden_size=h, num_layers=n, num_heads=heads,
                   intermediate_size=inter, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def build_delta(cfg: DeltaConfig, seed: int = 0):
    """A fresh delta ``LlamaForCausalLM`` whose logits are exactly zero (a no-op shift)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def init_embeddings_from_template(delta, template_embeddings) -> float:
    """Initialise the delta's (tied) token embeddings with the template's, projected onto their top
    ``hidden_size`` principal directions (truncated SVD), rescaled to the delta's init scale.

    Tokens the template treats alike start alike in the delta, so what the delta learns about one
    wording carries over to its paraphrases. Returns the fraction of variance kept. The delta stays
    a no-op: its final norm (the gate) is still zero.
    """
    import torch

    w = template_embeddings.detach().float()
    emb = delta.get_input_embeddings().weight
    if w.shape[0] != emb.shape[0]:
        raise InputError(f"template embeddings have {w.shape[0]} rows, the delta vocabulary {emb.shape[0]}",
                         fix="build the delta over the template's tokenizer")
    d = emb.shape[1]
    centred = w - w.mean(0, keepdim=True)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(d, vh.shape[0])
    proj = centred @ vh[:k].T                                          # (V, k)
    proj = proj * (emb.std() / proj.std())
    with torch.no_grad():
        emb.zero_()
        emb[:, :k] = proj
    return float((sv[:k] ** 2).sum() / (sv ** 2).sum())


def count_parameters(model) -> int:
    """Unique parameters (the tied embedding counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
