"""Vocabularies in one canonical form: the raw bytes each token stands for, plus its kind and roles.

A GGUF file (read through llama.cpp) and an HF ``tokenizer.json`` spell the same token differently
(byte-level BPE writes a space as ``Ġ``, SentencePiece as ``▁`` and raw bytes as ``<0xNN>``).
:func:`canonical_piece` removes those spellings so that vocabularies compare byte for byte:

>>> canonical_piece("Ġhello", NORMAL, "bpe"), canonical_piece("▁hello", NORMAL, "spm")
(b' hello', b' hello')
>>> canonical_piece("<0x0A>", BYTE, "spm"), canonical_piece("<|im_end|>", CONTROL, "bpe")
(b'\\n', b'')

The same vocabulary read from a GGUF file and from its ``tokenizer.json`` has the same
:attr:`Vocab.hash` (pieces and kinds only; roles and family are derived from them or from metadata).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmc_edge.errors import ArtifactError, InputError

log = logging.getLogger(__name__)

# Token kinds (uint8). Only NORMAL, BYTE and USER_DEFINED tokens carry text; CONTROL and UNUSED have b"".
NORMAL, CONTROL, BYTE, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5
KIND_NAMES = {NORMAL: "normal", CONTROL: "control", BYTE: "byte", USER_DEFINED: "user_defined", UNUSED: "unused"}
TEXT_KINDS = (NORMAL, BYTE, USER_DEFINED)

FAMILIES = ("bpe", "spm")
ROLES = ("bos", "eos", "eot", "pad")
# End-of-turn markers, most specific first. llama.cpp picks its EOT from a hash map (so, for SmolLM2, it
# reports <|endoftext|> rather than <|im_end|>); this fixed order makes the role the same from any source.
EOT_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_turn|>", "<|endofturn|>",
             "<turn|>", "<|endoftext|>")

_HASH_TAG = b"cmc-edge vocab v1\0"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[int, int]:
    """GPT-2's printable stand-ins (``Ġ`` = space, ``Ċ`` = newline, ...) back to the byte they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {c: b for b, c in zip(printable, chars)}


# str.translate table: stand-in character -> the latin-1 character of its byte (so .encode("latin-1") gives bytes).
_GPT2_TO_LATIN1 = _gpt2_byte_decoder()


def canonical_piece(text: str, kind: int, family: str) -> bytes:
    """The bytes a token contributes to decoded text (b"" for CONTROL and UNUSED tokens).

    - ``bpe`` (GPT-2 byte level): each character stands for one byte (``Ġ`` -> b" "); a piece that is
      only part of a UTF-8 character stays partial bytes, never U+FFFD. USER_DEFINED (added) tokens are
      stored verbatim, so they are plain UTF-8.
    - ``spm`` (SentencePiece): ``▁`` -> b" "; a BYTE token ``<0xNN>`` -> the single byte NN.
    """
    return canonical_pieces([text.encode("utf-8", "surrogatepass")], np.array([kind], np.uint8), family)[0]


_SPM_SPACE = "\u2581".encode("utf-8")
_BYTE_PIECES = {f"<0x{b:02x}>".encode(): bytes([b]) for b in range(256)}   # looked up lower-cased


def _gpt2_piece(raw: bytes) -> bytes:
    mapped = raw.decode("utf-8", "surrogatepass").translate(_GPT2_TO_LATIN1)
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        # A character outside GPT-2's byte table: keep its own UTF-8 bytes.
        return b"".join(c.encode("latin-1") if ord(c) < 256 else c.encode("utf-8", "surrogatepass") for c in mapped)


def canonical_pieces(raws: list[bytes], kinds: np.ndarray, family: str) -> list[bytes]:
    """:func:`canonical_piece` for a whole vocabulary, given each token's UTF-8 text as bytes."""
    if family not in FAMILIES:
        raise InputError(f"unknown tokenizer family {family!r}", fix=f"use one of {FAMILIES}")
    out = [b""] * len(raws)
    for i in np.flatnonzero(kinds == BYTE).tolist():
        piece = _BYTE_PIECES.get(raws[i].lower())
        if piece is None:
            raise InputError(f"byte token {raws[i]!r} (id {i}) is not of the form <0xNN>",
                             fix="the vocabulary is malformed; re-convert the model or tokenizer")
        out[i] = piece
    if family == "spm":
        for i in np.flatnonzero((kinds == NORMAL) | (kinds == USER_DEFINED)).tolist():
            out[i] = raws[i].replace(_SPM_SPACE, b" ")
    else:
        for i in np.flatnonzero(kinds == NORMAL).tolist():
            out[i] = _gpt2_piece(raws[i])
        for i in np.flatnonzero(kinds == USER_DEFINED).tolist():
            out[i] = raws[i]
    return out


@dataclass(frozen=True, eq=False)
class Vocab:
    """A vocabulary in canonical form. ``pieces[i]`` are token i's bytes; ``kinds[i]`` its kind (uint8)."""

    pieces: tuple[bytes, ...]
    kinds: np.ndarray  # (V,) uint8
    roles: dict[str, int] = field(default_factory=dict)
    family: str = "bpe"

    def __post_init__(self):
        kinds = np.asarray(self.kinds, dtype=np.uint8)
        if kinds.shape != (len(self.pieces),):
            raise InputError(f"a vocabulary needs one kind per piece: {len(self.pieces)} pieces, "
                             f"kinds of shape {kinds.shape}", fix="build kinds with one entry per token id")
        if self.family not in FAMILIES:
            raise InputError(f"unknown tokenizer family {self.family!r}", fix=f"use one of {FAMILIES}")
        bad = sorted(set(np.unique(kinds).tolist()) - set(KIND_NAMES))
        if bad:
            raise InputError(f"unknown token kinds {bad}", fix=f"use the module constants {KIND_NAMES}")
        for role, tid in self.roles.items():
            if role not in ROLES or not 0 <= tid < len(self.pieces):
                raise InputError(f"bad role {role!r} -> {tid}", fix=f"roles are {ROLES} with ids in [0, {len(self.pieces)})")
        kinds.setflags(write=False)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "pieces", tuple(self.pieces))
        object.__setattr__(self, "roles", dict(self.roles))

    @property
    def size(self) -> int:
        return len(self.pieces)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 over the pieces (length-prefixed, so unambiguous) and kinds.

        USER_DEFINED hashes as NORMAL: both are mapped alike, their bytes are in the hash, and sources
        disagree on the label (Gemma's GGUF calls its space runs user-defined, its tokenizer.json does not).
        """
        lengths = np.fromiter((len(p) for p in self.pieces), dtype="<u4", count=len(self.pieces))
        h = hashlib.sha256(_HASH_TAG)
        h.update(np.uint64(len(self.pieces)).tobytes())
        h.update(lengths.tobytes())
        h.update(np.where(self.kinds == USER_DEFINED, NORMAL, self.kinds).astype(np.uint8).tobytes())
        h.update(b"".join(self.pieces))
        return h.hexdigest()

    def find(self, text: str | bytes) -> list[int]:
        """Token ids whose canonical piece is ``text`` (a str is UTF-8 encoded)."""
        key = text.encode("utf-8") if isinstance(text, str) else text
        return [i for i, p in enumerate(self.pieces) if p == key]

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, family={self.family!r}, roles={self.roles}, hash={self.hash[:12]})"


def _eot_by_text(raws: list[bytes], kinds: np.ndarray) -> int | None:
    wanted = {t.encode(): rank for rank, t in enumerate(EOT_TEXTS)}
    found = sorted((wanted[raws[i]], i) for i in np.flatnonzero(kinds == CONTROL).tolist() if raws[i] in wanted)
    return found[0][1] if found else None


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

def _gguf_kinds(attrs: np.ndarray) -> np.ndarray:
    """llama.cpp token attribute bits -> kinds, so that a GGUF and its tokenizer.json agree:

    - CONTROL wins over UNUSED (Gemma's <unusedN> are both; a tokenizer.json only says "special");
    - USER_DEFINED wins over CONTROL: llama.cpp adds CONTROL to "control-looking" user-defined tokens
      such as Gemma's ``</s>`` (it logs a warning); the model file and its tokenizer.json say user-defined;
    - UNKNOWN (<unk>) counts as CONTROL.
    """
    import llama_cpp as L

    def has(bit):
        return (attrs & bit) != 0

    return np.select(
        [has(L.LLAMA_TOKEN_ATTR_USER_DEFINED), has(L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN),
         has(L.LLAMA_TOKEN_ATTR_UNUSED), has(L.LLAMA_TOKEN_ATTR_BYTE), has(L.LLAMA_TOKEN_ATTR_NORMAL)],
        [USER_DEFINED, CONTROL, UNUSED, BYTE, NORMAL], default=UNUSED).astype(np.uint8)


def read_gguf_vocab(path: str | Path) -> Vocab:
    """Read the vocabulary of a GGUF model through llama.cpp (``vocab_only``: no weights are loaded)."""
    import llama_cpp as L

    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} not found", fix="give the path to a .gguf model file")
    try:
        llm = L.Llama(str(path), vocab_only=True, verbose=False, n_ctx=8)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"llama.cpp could not read the vocabulary of {path}: {exc}",
                         fix="check that the file is a complete GGUF model") from exc
    try:
        v = L.llama_model_get_vocab(llm.model)
        vtype = L.llama_vocab_type(v)
        family = {L.LLAMA_VOCAB_TYPE_BPE: "bpe", L.LLAMA_VOCAB_TYPE_SPM: "spm", L.LLAMA_VOCAB_TYPE_UGM: "spm"}.get(vtype)
        if family is None:
            raise InputError(f"{path} has a llama.cpp vocabulary of type {vtype}, which cmc-edge cannot map",
                             fix="use a model with a byte-level BPE or SentencePiece vocabulary")
        n = L.llama_vocab_n_tokens(v)
        # map() over the ctypes functions: a Python-level loop body would double the time for 262k tokens.
        raws = list(map(functools.partial(L.llama_vocab_get_text, v), range(n)))
        attrs = np.fromiter(map(functools.partial(L.llama_vocab_get_attr, v), range(n)), dtype=np.int64, count=n)
        special = {role: int(fn(v)) for role, fn in (("bos", L.llama_vocab_bos), ("eos", L.llama_vocab_eos),
                                                      ("pad", L.llama_vocab_pad), ("eot", L.llama_vocab_eot))}
    finally:
        llm.close()
    kinds = _gguf_kinds(attrs)
    roles = {r: t for r, t in special.items() if r != "eot" and 0 <= t < n}
    eot = _eot_by_text(raws, kinds)
    if eot is None and 0 <= special["eot"] < n:
        eot = special["eot"]
    if eot is None:
        eot = roles.get("eos")                       # as read_tokenizer_json does
    if eot is not None:
        roles["eot"] = eot
    vocab = Vocab(pieces=tuple(canonical_pieces(raws, kinds, family)), kinds=kinds, roles=roles, family=family)
    log.debug("read %s from %s", vocab, path)
    return vocab


# ----------------------------------------------------------------------------- HF tokenizer.json

def _tokenizer_family(tj: dict) -> str:
    def types(node) -> set[str]:
        if not isinstance(node, dict):
            return set()
        out = {node.get("type", "")}
        for key in ("pretokenizers", "decoders", "normalizers"):
            for sub in node.get(key) or []:
                out |= types(sub)
        return out

    model = tj.get("model") or {}
    seen = types(tj.get("pre_tokenizer")) | types(tj.get("decoder"))
    if "ByteLevel" in seen:
        return "bpe"
    if model.get("type") in ("BPE", "Unigram") and ("Metaspace" in seen or "Replace" in seen
                                                      or model.get("byte_fallback")
                                                      or types(tj.get("normalizer")) & {"Replace", "Prepend"}):
        return "spm"
    raise InputError(f"unsupported tokenizer.json (model {model.get('type')!r}, pre-tokenizer/decoder {sorted(seen)})",
                     fix="cmc-edge maps byte-level BPE and SentencePiece-style (▁) tokenizers")


def _special_tokens(path: Path) -> dict[str, str]:
    """bos/eos/pad token texts from the tokenizer_config.json / special_tokens_map.json beside ``path``."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path.parent / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{f} is not valid JSON ({exc})", fix="re-save the tokenizer") from exc
        for role in ("bos", "eos", "pad"):
            val = cfg.get(f"{role}_token")
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str) and val:
                out[role] = val
    return out


def parse_tokenizer_json(path: Path, text: str | None = None) -> dict:
    """The content of a ``tokenizer.json`` (``text``: the file's text, when already read); a clear
    error when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", fix="re-save the tokenizer") from exc


def read_tokenizer_json(path: str | Path, parsed: dict | None = None) -> Vocab:
    """Read an HF ``tokenizer.json`` (byte-level BPE, or SentencePiece-style with ``▁`` and byte fallback).

    Added tokens become CONTROL (``special``) or USER_DEFINED; ids that name no token are UNUSED. Roles
    come from a ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it, when present.
    ``parsed``: the file's content already parsed by the caller (it is then not read again).
    """
    path = Path(path)
    if parsed is not None:
        tj = parsed
    elif not path.is_file():
        raise InputError(f"tokenizer file {path} not found", fix="point at a tokenizer.json saved by HF tokenizers")
    else:
        tj = parse_tokenizer_json(path)
    model = tj.get("model")
    if not isinstance(model, dict) or "vocab" not in model:
        raise ArtifactError(f"{path} has no model vocabulary", fix="save the tokenizer with a fast (HF tokenizers) backend")
    family = _tokenizer_family(tj)
    vocab = model["vocab"]
    if isinstance(vocab, dict):          # BPE / WordLevel: {piece: id}
        entries = [(int(i), str(t)) for t, i in vocab.items()]
    else:                                # Unigram: [[piece, score], ...] in id order
        entries = [(i, str(item[0])) for i, item in enumerate(vocab)]
    added = [(int(a["id"]), str(a["content"]), bool(a.get("special"))) for a in tj.get("added_tokens") or []]
    size = 1 + max([i for i, _ in entries] + [i for i, _, _ in added], default=-1)
    texts = [""] * size
    kinds = np.full(size, UNUSED, dtype=np.uint8)
    byte_fallback = family == "spm" and (model.get("byte_fallback") or model.get("type") == "Unigram")
    for i, t in entries:
        if i < 0:
            raise ArtifactError(f"{path} has a negative token id for {t!r}", fix="re-save the tokenizer")
        texts[i] = t
        kinds[i] = BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(t) else NORMAL
    for i, t, special in added:
        if i < 0:
            raise ArtifactError(f"{path} has a negative id for added token {t!r}", fix="re-save the tokenizer")
        texts[i] = t
        kinds[i] = CONTROL if special else USER_DEFINED
    raws = [t.encode("utf-8", "surrogatepass") for t in texts]
    first_id: dict[str, int] = {}
    for i in np.flatnonzero((kinds == CONTROL) | (kinds == USER_DEFINED)).tolist() + list(range(size)):
        first_id.setdefault(texts[i], i)             # added tokens first: they are what the config names
    roles = {role: first_id[text] for role, text in _special_tokens(path).items() if text in first_id}
    eot = _eot_by_text(raws, kinds)
    if eot is None and "eos" in roles:
        eot = roles["eos"]
    if eot is not None:
        roles["eot"] = eot
    vocab = Vocab(pieces=tuple(canonical_pieces(raws, kinds, family)), kinds=kinds, roles=roles, family=family)
    log.debug("read %s from %s", vocab, path)
    return vocab
