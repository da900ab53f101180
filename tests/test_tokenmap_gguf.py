"""Token maps between the real packaged models: SmolLM2 (49,152, byte-level BPE) and Gemma 3 (262,144,
SentencePiece). The fast builder must agree with the plain reference in test_tokenmap.py."""

from __future__ import annotations

import numpy as np
import pytest

from cmc_edge.tokenmap import (BYTE, CONTROL, EXACT, PREFIX_EDIT, SPECIAL_ROLE, UNMAPPED, build_token_map,
                               cached_token_map, explain, load_token_map, map_stats, read_gguf_vocab,
                               read_tokenizer_json, save_token_map)
from test_tokenmap import assert_matches_reference

pytestmark = pytest.mark.gguf


@pytest.fixture(scope="session")
def smol(smollm2):
    return read_gguf_vocab(smollm2)


@pytest.fixture(scope="session")
def gemma(gemma3):
    return read_gguf_vocab(gemma3)


def _hf_tokenizer_dir(gguf_path, out):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    return out / "tokenizer.json"


@pytest.fixture(scope="session")
def smol_tokenizer_json(smollm2, tmp_path_factory):
    """SmolLM2's tokenizer as transformers converts it from the GGUF (about 10 s, once per session)."""
    return _hf_tokenizer_dir(smollm2, tmp_path_factory.mktemp("smol-tok"))


def test_read_smollm2(smol):
    assert smol.size == 49152 and smol.family == "bpe"
    assert smol.roles == {"bos": 1, "eos": 2, "pad": 2, "eot": 2}        # <|im_start|>, <|im_end|>
    assert (smol.kinds[:17] == CONTROL).all() and smol.pieces[:17] == (b"",) * 17
    assert len(smol.find(" hello")) == 1 and len(smol.find("\n\n")) == 1
    assert not (smol.kinds == BYTE).any()


def test_read_gemma3(gemma):
    assert gemma.size == 262144 and gemma.family == "spm"
    assert gemma.roles == {"bos": 2, "eos": 1, "pad": 0, "eot": 106}     # eot = <end_of_turn>
    assert gemma.pieces[238:238 + 256] == tuple(bytes([b]) for b in range(256))   # <0x00>..<0xFF>
    assert (gemma.kinds[238:238 + 256] == BYTE).all()
    assert gemma.find(" hello") and gemma.find("\n\n")


def test_gguf_and_tokenizer_json_hash_alike(smol, smol_tokenizer_json):
    hf = read_tokenizer_json(smol_tokenizer_json)
    assert hf.hash == smol.hash and hf.pieces == smol.pieces and hf.roles == smol.roles
    assert build_token_map(smol, hf).is_identity


@pytest.mark.slow
def test_gemma_gguf_and_tokenizer_json_hash_alike(gemma, gemma3, tmp_path):
    """Gemma's GGUF labels its space runs user-defined and llama.cpp relabels </s> control; both
    readers still agree (about 35 s for the conversion)."""
    hf = read_tokenizer_json(_hf_tokenizer_dir(gemma3, tmp_path))
    assert hf.hash == gemma.hash and hf.roles == gemma.roles


def _sample(vocab, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab.size, n, replace=False)
    return np.union1d(ids, list(vocab.roles.values()))


def test_gemma_to_smollm2_matches_reference(gemma, smol):
    tm = assert_matches_reference(gemma, smol, _sample(gemma))
    assert tm.kind[106] == SPECIAL_ROLE and tm.index[106] == 2               # <end_of_turn> -> <|im_end|>
    assert tm.kind[0] == UNMAPPED                                            # <pad>: SmolLM2's pad is its eos
    hello = gemma.find(" hello")[0]
    assert tm.kind[hello] == EXACT and smol.pieces[tm.index[hello]] == b" hello"


def test_smollm2_to_gemma_matches_reference(smol, gemma):
    tm = assert_matches_reference(smol, gemma, _sample(smol, seed=1))
    assert tm.kind[2] == SPECIAL_ROLE and tm.index[2] == 106                 # <|im_end|> -> <end_of_turn>
    assert tm.mask.mean() > 0.99


def test_coverage_and_explain(gemma, smol):
    tm = build_token_map(gemma, smol)
    stats = map_stats(tm, gemma, smol, sample_token_ids=[gemma.find(w)[0] for w in (" the", " hello", "\n")])
    assert stats["by_frequency"]["exact"] == 1.0
    assert stats["text_coverage"] > 0.9 and sum(stats["by_kind"].values()) == gemma.size
    # Many Indic words in Gemma start " \xe0\xa6" (Bengali); SmolLM2 has no " \xe0" piece, and a bare " "
    # may not stand in for a word, so they stay unmapped.
    pieces = set(smol.pieces)
    unmapped = [i for i in np.flatnonzero(tm.kind == UNMAPPED).tolist() if gemma.kinds[i] != CONTROL]
    assert len(unmapped) > 1000
    word = next(i for i in unmapped if gemma.pieces[i].startswith(b" "))
    assert b" " in pieces and gemma.pieces[word][:2] not in pieces
    assert "no delta token is a prefix or an extension" in explain(tm, gemma, smol, word)
    assert "prefix" in explain(tm, gemma, smol, "日本語") or "[exact]" in explain(tm, gemma, smol, "日本語")
    assert tm.kind[gemma.find("日本語")[0]] in (EXACT, PREFIX_EDIT)


def test_cached_real_map_round_trip(gemma3, smol, tmp_path):
    tm = cached_token_map(gemma3, smol, tmp_path)
    again = cached_token_map(gemma3, smol, tmp_path)
    assert np.array_equal(tm.index, again.index) and np.array_equal(tm.kind, again.kind)
    path = save_token_map(tm, tmp_path / "out.npz")
    assert np.array_equal(load_token_map(path, delta_hash=smol.hash).src, tm.src)
