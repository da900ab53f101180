"""Token-map stage on small synthetic vocabularies: canonical forms, PM-MinED against a plain
reference, tie-breaks, roles, artifacts and the cache. The real models are in test_tokenmap_gguf.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from cmc_edge.errors import ArtifactError, InputError
from cmc_edge.tokenmap import (ALGORITHM_VERSION, BYTE, CONTROL, EXACT, IDENTITY, NORMAL, PREFIX_EDIT, SPECIAL_ROLE,
                               UNMAPPED, UNUSED, USER_DEFINED, TokenMap, Vocab, build_token_map, cached_token_map,
                               canonical_piece, explain, load_token_map, map_stats, read_gguf_vocab,
                               read_tokenizer_json, save_token_map)
from cmc_edge.tokenmap import store

TEXT = (NORMAL, BYTE, USER_DEFINED)


# ----------------------------------------------------------------------------- the plain reference

def _spaces_only(b: bytes) -> bool:
    return bool(b) and b.strip(b" ") == b""


def reference_roles(target: Vocab, delta: Vocab) -> dict[int, int]:
    """Role mapping, spelled out: eot > eos > bos > pad; eot may fall back to the delta's eos; a delta
    pad that is also one of its other role tokens does not count."""
    droles = dict(delta.roles)
    if "pad" in droles and any(droles["pad"] == i for r, i in droles.items() if r != "pad"):
        droles.pop("pad")
    out = {}
    for t in set(target.roles.values()):
        for role in ("eot", "eos", "bos", "pad"):
            if target.roles.get(role) != t:
                continue
            options = ("eot", "eos") if role == "eot" else (role,)
            d = next((droles[r] for r in options if r in droles), None)
            if d is not None:
                out[t] = d
                break
    return out


class Reference:
    """PM-MinED the slow, obvious way: every delta candidate, Levenshtein from rapidfuzz, min over
    (distance, extension-after-prefix, BYTE-after-non-BYTE, id). Candidates are bucketed by first byte
    only so that 262k-token vocabularies stay testable (prefix-related pieces share their first byte)."""

    def __init__(self, target: Vocab, delta: Vocab):
        self.target, self.delta = target, delta
        self.roles = reference_roles(target, delta)
        self.buckets: dict[int, tuple] = {}
        by_first: dict[int, list[int]] = {}
        for d, p in enumerate(delta.pieces):
            if p and delta.kinds[d] in TEXT:
                by_first.setdefault(p[0], []).append(d)
        for b, ids in by_first.items():
            width = max(len(delta.pieces[d]) for d in ids)
            grid = np.zeros((len(ids), width), np.int16) - 1
            for r, d in enumerate(ids):
                grid[r, :len(delta.pieces[d])] = np.frombuffer(delta.pieces[d], np.uint8)
            lens = np.array([len(delta.pieces[d]) for d in ids])
            self.buckets[b] = (np.array(ids), grid, lens)

    def candidates(self, s: bytes) -> list[int]:
        """Delta ids whose piece is a prefix of s or has s as a prefix (equality included)."""
        if s[0] not in self.buckets:
            return []
        ids, grid, lens = self.buckets[s[0]]
        m = min(len(s), grid.shape[1])
        want = np.frombuffer(s[:m], np.uint8).astype(np.int16)
        cols = np.arange(m)
        mismatch = (grid[:, :m] != want) & (cols < lens[:, None])
        return ids[~mismatch.any(axis=1)].tolist()

    def __call__(self, t: int) -> tuple[int, int]:
        """(kind, delta id) for target token t."""
        if self.target.hash == self.delta.hash:
            return IDENTITY, t
        if t in self.roles:
            return SPECIAL_ROLE, self.roles[t]
        s = self.target.pieces[t]
        if not s or self.target.kinds[t] not in TEXT:
            return UNMAPPED, 0
        scored = []
        for d in self.candidates(s):
            p = self.delta.pieces[d]
            assert p.startswith(s) or s.startswith(p)
            if _spaces_only(p) and not _spaces_only(s):
                continue
            scored.append((Levenshtein.distance(s, p), 0 if s.startswith(p) else 1,
                           int(self.delta.kinds[d] == BYTE), d))
        if not scored:
            return UNMAPPED, 0
        best = min(scored)
        return (EXACT if best[0] == 0 else PREFIX_EDIT), best[3]


def assert_matches_reference(target: Vocab, delta: Vocab, ids=None) -> TokenMap:
    tm = build_token_map(target, delta)
    ref = Reference(target, delta)
    ids = range(target.size) if ids is None else ids
    bad = []
    for t in ids:
        want = ref(int(t))
        got = (int(tm.kind[t]), int(tm.index[t]))
        if got != want:
            bad.append((int(t), target.pieces[t], got, want, delta.pieces[got[1]], delta.pieces[want[1]]))
    assert not bad, f"{len(bad)} differences (token, piece, fast, reference, ...): {bad[:5]}"
    return tm


def vocab(*pieces, kinds=None, roles=None, family="spm") -> Vocab:
    ks = np.full(len(pieces), NORMAL, np.uint8) if kinds is None else np.array(kinds, np.uint8)
    return Vocab(tuple(pieces), ks, roles or {}, family)


# ----------------------------------------------------------------------------- canonical forms

CANONICAL = [
    # text, kind, family, bytes
    ("Ġhello", NORMAL, "bpe", b" hello"),
    ("ĠĠĠ", NORMAL, "bpe", b"   "),
    ("ĊĊ", NORMAL, "bpe", b"\n\n"),
    ("ĉ", NORMAL, "bpe", b"\t"),
    ("2024", NORMAL, "bpe", b"2024"),
    ("æĹ¥æľ¬", NORMAL, "bpe", "日本".encode()),
    ("æĹ", NORMAL, "bpe", b"\xe6\x97"),                       # half a character stays raw bytes
    ("ðŁĺĢ", NORMAL, "bpe", "😀".encode()),
    ("Ā", NORMAL, "bpe", b"\x00"),
    ("ÿ", NORMAL, "bpe", b"\xff"),
    ("Ã©", NORMAL, "bpe", "é".encode()),
    ("<tool>", USER_DEFINED, "bpe", b"<tool>"),               # added tokens are stored verbatim
    ("日本", USER_DEFINED, "bpe", "日本".encode()),
    ("<|im_end|>", CONTROL, "bpe", b""),
    ("▁hello", NORMAL, "spm", b" hello"),
    ("▁▁▁", NORMAL, "spm", b"   "),
    ("\n\n", USER_DEFINED, "spm", b"\n\n"),
    ("\t\t", NORMAL, "spm", b"\t\t"),
    ("2024", NORMAL, "spm", b"2024"),
    ("▁日本", NORMAL, "spm", " 日本".encode()),
    ("😀", NORMAL, "spm", "😀".encode()),
    ("<0x0A>", BYTE, "spm", b"\n"),
    ("<0x00>", BYTE, "spm", b"\x00"),
    ("<0xE6>", BYTE, "spm", b"\xe6"),
    ("<0xff>", BYTE, "spm", b"\xff"),
    ("<end_of_turn>", CONTROL, "spm", b""),
    ("<unused7>", UNUSED, "spm", b""),
]


@pytest.mark.parametrize("text,kind,family,want", CANONICAL)
def test_canonical_piece(text, kind, family, want):
    assert canonical_piece(text, kind, family) == want


@pytest.mark.parametrize("text,kind,family", [("<0xZZ>", BYTE, "spm"), ("A", BYTE, "spm"), ("a", NORMAL, "wordpiece")])
def test_canonical_piece_rejects(text, kind, family):
    with pytest.raises(InputError):
        canonical_piece(text, kind, family)


def _gpt2_table() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


GPT2 = _gpt2_table()


@given(st.binary(min_size=1, max_size=24))
def test_bpe_canonical_inverts_gpt2_encoding(raw):
    assert canonical_piece("".join(GPT2[b] for b in raw), NORMAL, "bpe") == raw


@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=16))
def test_spm_and_bpe_agree_on_the_same_text(text):
    spm = canonical_piece("\u2581" + text.replace(" ", "\u2581"), NORMAL, "spm")
    bpe = canonical_piece("".join(GPT2[b] for b in (" " + text).encode()), NORMAL, "bpe")
    assert spm == bpe == (" " + text).encode()


@given(st.integers(0, 255), st.sampled_from(["spm", "bpe"]))
def test_byte_tokens(b, family):
    assert canonical_piece(f"<0x{b:02X}>", BYTE, family) == bytes([b])


# ----------------------------------------------------------------------------- Vocab

def test_vocab_hash_is_order_and_split_sensitive_and_cached():
    a = vocab(b"ab", b"c")
    assert a.hash != vocab(b"a", b"bc").hash                     # length-prefixed, not concatenated
    assert a.hash != vocab(b"c", b"ab").hash
    assert a.hash != vocab(b"ab", b"c", kinds=[NORMAL, BYTE]).hash
    assert a.hash == vocab(b"ab", b"c", roles={"eos": 1}).hash   # roles are metadata, not vocabulary
    # USER_DEFINED and NORMAL are mapped alike; sources disagree on the label (see Vocab.hash).
    assert a.hash == vocab(b"ab", b"c", kinds=[USER_DEFINED, NORMAL]).hash
    assert a.hash is a.hash


@pytest.mark.parametrize("kwargs", [
    dict(pieces=(b"a",), kinds=np.array([NORMAL, NORMAL], np.uint8)),
    dict(pieces=(b"a",), kinds=np.array([9], np.uint8)),
    dict(pieces=(b"a",), kinds=np.array([NORMAL], np.uint8), roles={"eos": 5}),
    dict(pieces=(b"a",), kinds=np.array([NORMAL], np.uint8), roles={"sep": 0}),
    dict(pieces=(b"a",), kinds=np.array([NORMAL], np.uint8), family="wordpiece"),
])
def test_vocab_rejects_bad_input(kwargs):
    with pytest.raises(InputError):
        Vocab(**kwargs)


def test_vocab_kinds_are_read_only():
    v = vocab(b"a")
    with pytest.raises(ValueError):
        v.kinds[0] = CONTROL


# ----------------------------------------------------------------------------- tokenizer.json

def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_read_tokenizer_json_bytelevel_bpe(tmp_path):
    vocab_ = {"Ġhello": 3, "hello": 4, "æĹ": 5, "Ċ": 6}
    added = [{"id": 0, "content": "<|endoftext|>", "special": True}, {"id": 1, "content": "<|im_start|>", "special": True},
             {"id": 2, "content": "<|im_end|>", "special": True}, {"id": 8, "content": "<tool>", "special": False}]
    tj = _write(tmp_path / "tokenizer.json", {"model": {"type": "BPE", "vocab": vocab_, "merges": []},
                                              "pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
                                              "added_tokens": added})
    _write(tmp_path / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                 "pad_token": {"content": "<|endoftext|>"}})
    v = read_tokenizer_json(tj)
    assert v.family == "bpe" and v.size == 9
    assert v.pieces == (b"", b"", b"", b" hello", b"hello", b"\xe6\x97", b"\n", b"", b"<tool>")
    assert v.kinds.tolist() == [CONTROL, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, NORMAL, UNUSED, USER_DEFINED]
    assert v.roles == {"bos": 1, "eos": 2, "pad": 0, "eot": 2}


def test_read_tokenizer_json_sentencepiece_with_byte_fallback(tmp_path):
    vocab_ = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<0x0A>": 3, "<0xE6>": 4, "▁hello": 5, "<end_of_turn>": 6}
    added = [{"id": i, "content": c, "special": True} for c, i in vocab_.items() if c.startswith("<") and "0x" not in c]
    tj = _write(tmp_path / "tokenizer.json", {
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}]},
        "model": {"type": "BPE", "byte_fallback": True, "vocab": vocab_, "merges": []}, "added_tokens": added})
    v = read_tokenizer_json(tj)                                  # no config beside it: eot by name only
    assert v.family == "spm"
    assert v.pieces == (b"", b"", b"", b"\n", b"\xe6", b" hello", b"")
    assert v.kinds.tolist() == [CONTROL, CONTROL, CONTROL, BYTE, BYTE, NORMAL, CONTROL]
    assert v.roles == {"eot": 6}


def test_read_tokenizer_json_errors(tmp_path):
    with pytest.raises(InputError):
        read_tokenizer_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        read_tokenizer_json(tmp_path / "bad.json")
    wp = _write(tmp_path / "wp.json", {"model": {"type": "WordPiece", "vocab": {"a": 0}},
                                       "pre_tokenizer": {"type": "BertPreTokenizer"}})
    with pytest.raises(InputError, match="unsupported tokenizer"):
        read_tokenizer_json(wp)


def test_read_gguf_vocab_of_the_tiny_model(tiny_gguf):
    v = read_gguf_vocab(tiny_gguf)
    assert v.family == "bpe"
    assert v.pieces[:256] == tuple(bytes([b]) for b in range(256))     # tiny_gguf lists the byte table in order
    assert v.find(" the") and v.find("\n\n") and v.find(" capital")
    assert v.roles["bos"] == v.size - 2 and v.roles["eos"] == v.roles["eot"] == v.size - 1
    assert (v.kinds[-3:] == CONTROL).all() and v.pieces[-3:] == (b"", b"", b"")


def test_read_gguf_vocab_missing_file(tmp_path):
    with pytest.raises(InputError):
        read_gguf_vocab(tmp_path / "nope.gguf")


# ----------------------------------------------------------------------------- PM-MinED

def test_worked_example_kinds():
    target = vocab(b" hello", b" hel", b"xyz", b" h", b"", kinds=[NORMAL] * 4 + [CONTROL])
    delta = vocab(b" h", b" he", b" hello!", b" hello")
    tm = build_token_map(target, delta)
    assert tm.kind.tolist() == [EXACT, PREFIX_EDIT, UNMAPPED, EXACT, UNMAPPED]
    assert tm.index.tolist() == [3, 1, 0, 0, 0]
    assert tm.mask.tolist() == [True, True, False, True, False]
    assert tm.dst.tolist() == [0, 1, 3] and tm.src.tolist() == [3, 1, 0]


TIES = [
    # (target piece, delta pieces, delta kinds or None, expected delta id, expected kind, why)
    (b"abc", [b"abcd", b"ab"], None, 1, PREFIX_EDIT, "equal distance: the prefix beats the extension"),
    (b"abcdef", [b"ab", b"abcdefg"], None, 1, PREFIX_EDIT, "smaller distance beats prefix-first"),
    (b"ab", [b"aby", b"abx"], None, 0, PREFIX_EDIT, "two extensions at one distance: lowest id, not lowest string"),
    (b"ab", [b"abx", b"aby"], None, 0, PREFIX_EDIT, "... and the other way round"),
    (b"A", [b"A", b"A"], [BYTE, NORMAL], 1, EXACT, "a non-BYTE token beats a BYTE token with the same bytes"),
    (b"A", [b"A", b"A"], [NORMAL, NORMAL], 0, EXACT, "duplicate surfaces: lowest id"),
    (b"Ab", [b"A", b"A", b"Abcd"], [BYTE, USER_DEFINED, NORMAL], 1, PREFIX_EDIT, "non-BYTE rule applies to prefixes"),
    (b"ab", [b"x", b"ab"], [NORMAL, CONTROL], None, UNMAPPED, "CONTROL delta tokens are never candidates"),
    (b" x", [b" ", b"x"], None, None, UNMAPPED, "a bare-space piece never stands for a word"),
    (b" xy", [b" ", b" x"], None, 1, PREFIX_EDIT, "... but a longer prefix does"),
    (b"   ", [b" ", b"x"], None, 0, PREFIX_EDIT, "spaces-only targets may use spaces-only pieces"),
    (b" ", [b"  ", b" a"], None, 0, PREFIX_EDIT, "... extensions too (lowest id among equals)"),
    (b"\x00", [b"", b"\x00\x00", b"\x00"], None, 2, EXACT, "NUL bytes are ordinary bytes"),
    (b"\xff", [b"\xff\xff", b"\xfe\xff"], None, 0, PREFIX_EDIT, "0xFF needs no carry"),
]


@pytest.mark.parametrize("s,pieces,kinds,want,want_kind,why", TIES, ids=[t[-1] for t in TIES])
def test_tie_breaks(s, pieces, kinds, want, want_kind, why):
    target = vocab(s)
    delta = vocab(*pieces, kinds=kinds)
    tm = assert_matches_reference(target, delta)
    assert int(tm.kind[0]) == want_kind, why
    if want is not None:
        assert int(tm.index[0]) == want, why


def test_roles_map_by_role():
    e = b""
    target = vocab(e, e, e, e, e, b"hi", kinds=[CONTROL] * 5 + [NORMAL],
                   roles={"bos": 0, "eos": 1, "eot": 2, "pad": 3})
    delta = vocab(e, e, e, b"hi", kinds=[CONTROL] * 3 + [NORMAL], roles={"bos": 2, "eos": 1, "eot": 0, "pad": 1})
    tm = assert_matches_reference(target, delta)
    assert tm.kind.tolist() == [SPECIAL_ROLE] * 3 + [UNMAPPED, UNMAPPED, EXACT]
    assert tm.index[:3].tolist() == [2, 1, 0]          # bos->bos, eos->eos, eot->eot; pad=eos is an alias
    # A target end-of-turn falls back to the delta's eos; a token with several roles takes the first of eot/eos/bos/pad.
    t2 = vocab(e, e, kinds=[CONTROL] * 2, roles={"eos": 0, "eot": 0, "pad": 0, "bos": 1})
    tm2 = assert_matches_reference(t2, vocab(e, e, e, kinds=[CONTROL] * 3, roles={"eos": 2, "bos": 0, "pad": 1}))
    assert tm2.index.tolist() == [2, 0] and tm2.kind.tolist() == [SPECIAL_ROLE] * 2
    # No shared role: control tokens stay unmapped.
    tm3 = build_token_map(target, vocab(b"hi"))
    assert tm3.kind.tolist() == [UNMAPPED] * 5 + [EXACT]


def test_identity_for_identical_vocabularies():
    a = vocab(b"a", b"b", b"", kinds=[NORMAL, NORMAL, CONTROL], roles={"eos": 2})
    b = vocab(b"a", b"b", b"", kinds=[NORMAL, NORMAL, CONTROL])
    tm = build_token_map(a, b)
    assert tm.is_identity and (tm.kind == IDENTITY).all() and tm.mask.all()
    assert tm.index.tolist() == tm.dst.tolist() == tm.src.tolist() == [0, 1, 2]
    assert not build_token_map(a, vocab(b"a", b"b", b"c")).is_identity


def test_token_map_is_immutable_and_validated():
    tm = build_token_map(vocab(b"a", b"b"), vocab(b"a"))
    with pytest.raises(ValueError):
        tm.index[0] = 1
    with pytest.raises(InputError):
        TokenMap(np.zeros(2, np.int32), np.array([True, False]), np.zeros(2, np.uint8), "t", "d")
    with pytest.raises(InputError):
        TokenMap(np.zeros(2, np.int32), np.zeros(3, bool), np.zeros(2, np.uint8), "t", "d")


ALPHABET = b" ab\x00\xff"
pieces_st = st.binary(min_size=0, max_size=5).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
kind_st = st.sampled_from([NORMAL, NORMAL, NORMAL, BYTE, USER_DEFINED, CONTROL, UNUSED])
vocab_st = st.lists(st.tuples(pieces_st, kind_st), min_size=1, max_size=40).map(
    lambda items: vocab(*(p if k in TEXT else b"" for p, k in items), kinds=[k for _, k in items]))


@settings(max_examples=300, deadline=None)
@given(vocab_st, vocab_st)
def test_fast_builder_equals_reference(target, delta):
    assert_matches_reference(target, delta)


@settings(max_examples=200, deadline=None)
@given(vocab_st, vocab_st)
def test_map_properties(target, delta):
    tm = build_token_map(target, delta)
    assert tm.index.dtype == np.int32 and tm.mask.dtype == bool and tm.kind.dtype == np.uint8
    assert (tm.mask == (tm.kind != UNMAPPED)).all() and (tm.index[~tm.mask] == 0).all()
    delta_text = {p for p, k in zip(delta.pieces, delta.kinds) if p and k in TEXT}
    for t, (s, k) in enumerate(zip(target.pieces, target.kinds)):
        if tm.is_identity:
            break
        p = delta.pieces[tm.index[t]]
        if tm.kind[t] == EXACT:
            assert p == s
        elif tm.kind[t] == PREFIX_EDIT:
            assert p != s and (p.startswith(s) or s.startswith(p))
        if k in TEXT and s in delta_text:                     # exact matches are always found
            assert tm.kind[t] == EXACT
        if k not in TEXT:
            assert tm.kind[t] == UNMAPPED                     # no roles in these vocabularies


def test_random_larger_vocabularies_match_reference():
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b" \n\x00\xffabc\xe6\x97", np.uint8)

    def rand_vocab(n, family):
        ps = {bytes(rng.choice(alphabet, rng.integers(1, 7))) for _ in range(n)}
        ps = sorted(ps, key=lambda _: rng.random())
        kinds = rng.choice([NORMAL] * 8 + [USER_DEFINED, BYTE], len(ps))
        return vocab(*ps, kinds=kinds, family=family)

    assert_matches_reference(rand_vocab(3000, "spm"), rand_vocab(1500, "bpe"))


# ----------------------------------------------------------------------------- artifacts

@pytest.fixture
def small_map():
    target = vocab(b"ab", b"a", b"", b"zz", kinds=[NORMAL, NORMAL, CONTROL, NORMAL], roles={"eos": 2})
    delta = vocab(b"a", b"", b"abc", kinds=[NORMAL, CONTROL, NORMAL], roles={"eos": 1})
    return target, delta, build_token_map(target, delta)


def test_save_load_round_trip(tmp_path, small_map):
    target, delta, tm = small_map
    path = save_token_map(tm, tmp_path / "m.npz")
    back = load_token_map(path, target_hash=target.hash, delta_hash=delta.hash)
    for name in ("index", "mask", "kind"):
        got, want = getattr(back, name), getattr(tm, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert (back.target_hash, back.delta_hash, back.algorithm_version) == (target.hash, delta.hash, ALGORITHM_VERSION)
    assert back.kind.tolist() == [PREFIX_EDIT, EXACT, SPECIAL_ROLE, UNMAPPED]
    with np.load(path, allow_pickle=False) as z:                 # plain arrays: no pickle needed to read it
        assert json.loads(z["meta"].tobytes())["format_version"] == store.FORMAT_VERSION


@pytest.mark.parametrize("kw,what", [
    (dict(target_hash="0" * 64), "target vocabulary"),
    (dict(delta_hash="0" * 64), "delta vocabulary"),
])
def test_load_rejects_a_foreign_map(tmp_path, small_map, kw, what):
    _, _, tm = small_map
    path = save_token_map(tm, tmp_path / "m.npz")
    with pytest.raises(ArtifactError, match=what) as err:
        load_token_map(path, **kw)
    assert "cmc-edge map" in err.value.fix


def test_load_rejects_other_versions(tmp_path, small_map, monkeypatch):
    target, delta, tm = small_map
    old = TokenMap(tm.index, tm.mask, tm.kind, tm.target_hash, tm.delta_hash, algorithm_version=ALGORITHM_VERSION - 1)
    with pytest.raises(ArtifactError, match="algorithm version"):
        load_token_map(save_token_map(old, tmp_path / "old.npz"))
    monkeypatch.setattr(store, "FORMAT_VERSION", store.FORMAT_VERSION + 1)
    path = save_token_map(tm, tmp_path / "new.npz")
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="format version"):
        load_token_map(path)


def test_load_rejects_non_maps(tmp_path, small_map):
    _, _, tm = small_map
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "other.npz", index=np.zeros(3, np.int32))
    good = save_token_map(tm, tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    for name in ("text.npz", "other.npz", "cut.npz", "missing.npz"):
        with pytest.raises(ArtifactError):
            load_token_map(tmp_path / name)


def test_failed_save_leaves_nothing_and_keeps_the_old_map(tmp_path, small_map, monkeypatch):
    _, _, tm = small_map
    path = save_token_map(tm, tmp_path / "m.npz")
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(store.np, "savez", broken_savez)
    with pytest.raises(OSError):
        save_token_map(tm, path)
    with pytest.raises(OSError):
        save_token_map(tm, tmp_path / "new.npz")
    assert sorted(os.listdir(tmp_path)) == ["m.npz"] and path.read_bytes() == before


def test_cached_token_map_builds_once(tmp_path, tiny_gguf, monkeypatch):
    delta = read_gguf_vocab(tiny_gguf)
    shifted = Vocab(delta.pieces[1:], delta.kinds[1:], {}, "bpe")    # another vocabulary: a real map
    cache = tmp_path / "maps"
    first = cached_token_map(tiny_gguf, shifted, cache)
    assert not first.is_identity and first.kind[ord("a")] == EXACT and first.index[ord("a")] == ord("a") - 1
    maps = list(cache.glob("tokenmap-*.npz"))
    assert len(maps) == 1 and len(list(cache.iterdir())) == 2         # the map and the GGUF's vocab note

    def no_read(path):
        raise AssertionError("a cache hit must not read the vocabulary again")

    monkeypatch.setattr(store, "read_gguf_vocab", no_read)
    again = cached_token_map(tiny_gguf, shifted, cache)
    assert np.array_equal(again.index, first.index) and np.array_equal(again.kind, first.kind)
    monkeypatch.undo()
    assert cached_token_map(tiny_gguf, delta, cache).is_identity            # another delta: another entry
    # A corrupt entry is rebuilt, not trusted.
    maps[0].write_bytes(b"garbage")
    rebuilt = cached_token_map(tiny_gguf, shifted, cache)
    assert np.array_equal(rebuilt.index, first.index)


# ----------------------------------------------------------------------------- stats and explain

def test_map_stats(small_map):
    target, delta, tm = small_map
    s = map_stats(tm, target, delta, sample_token_ids=[0, 0, 1, 3])
    assert s["by_kind"] == {"unmapped": 1, "exact": 1, "prefix_edit": 1, "special_role": 1, "identity": 0}
    assert s["coverage"] == 0.75 and s["text_tokens"] == 3 and s["text_coverage"] == pytest.approx(2 / 3)
    assert s["by_frequency"]["prefix_edit"] == 0.5 and s["by_frequency"]["unmapped"] == 0.25
    assert s["sample_coverage"] == 0.75
    with pytest.raises(InputError):
        map_stats(tm, target, delta, sample_token_ids=[4])
    with pytest.raises(InputError):
        map_stats(tm, delta, target)


def test_explain(small_map):
    target, delta, tm = small_map
    assert "[exact]" in explain(tm, target, delta, 1)
    line = explain(tm, target, delta, "ab")
    assert line.startswith("target 0 b'ab'") and "delta 0 b'a'" in line and "prefix of" in line and "distance 1" in line
    assert "role eos" in explain(tm, target, delta, 2)
    assert "no delta token is a prefix" in explain(tm, target, delta, "zz")
    assert "no target token" in explain(tm, target, delta, "nothing")
    with pytest.raises(InputError):
        explain(tm, target, delta, 99)
