"""Write a tiny, real GGUF (Llama architecture, GPT-2 byte-level BPE vocabulary) for tests.

llama.cpp loads it, and transformers dequantizes it as a torch template, so every stage can be
tested end to end in seconds without the real models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges learned from nothing in particular: enough to make tokenizations differ from bytes.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s", "e r", "o n", "Ġ c", "a t", "Ġ o", "Ġ i", "e n", "Ġ p",
          "Ġ w", "a n", "r e", "o r", "Ġ f", "Ġ b", "Ġc a", "p i", "Ġ P", "a r", "i s", "Ġ F", "r a", "n c",
          "Ġ Ġ", "ĠĠ ĠĠ", "Ġca pi", "Ġcapi t", "Ġcapit a", "Ġcapita l", "Ġo f", "Ġi s",
          "Ġ T", "Ċ Ċ", "Ġ I"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)]
    for m in MERGES:
        left, right = m.split(" ")
        assert left in tokens and right in tokens, f"merge {m!r} uses a token not in the vocabulary"
        merged = left + right
        if merged not in tokens:
            tokens.append(merged)
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, list(MERGES), types


def make_tiny_gguf(path: str | Path, *, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
                   n_ff: int = 64, n_ctx: int = 512) -> Path:
    import gguf

    path = Path(path)
    tokens, merges, types = tiny_vocab()
    V = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def t(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    w.add_tensor("token_embd.weight", t(V, n_embd, scale=8.0))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", t(n_embd, n_embd, scale=2.0))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd, scale=2.0))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd, scale=2.0))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff, scale=2.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", t(V, n_embd, scale=8.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
