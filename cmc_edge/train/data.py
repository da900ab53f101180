"""Training data: JSONL records -> prompt/response token ids in the template's chat format.

Accepted record shapes (one JSON object per line):

- ``{"prompt": "...", "response": "..."}``
- alpaca style ``{"instruction": "...", "input": "...", "output": "..."}``
- chat ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}``
- plain text ``{"text": "..."}``: no chat format at all, as a document or a completion prompt reads;
  its first token is the prompt and the rest the response (no end-of-turn token). As retain data it
  holds the delta silent on plain prose, which no chat record reaches.

An optional ``"system"`` string sets the system prompt. Unlearning (forget) records may carry
``"avoid": ["Paris", ...]``: strings the combined model must not start to say anywhere in that
response (the forgotten answer); the trainer adds an unlikelihood term on every delta-vocabulary
token that begins one of them (see :func:`avoid_token_ids`). With ``"keep": [...]`` a forget
record's kept words are read, not taught (no cross-entropy on them), and ``"avoid_next": [...]``
avoids, at the one position right after them, every token that is a beginning of those strings,
single characters included (:func:`prefix_token_ids`): the answer's own spelling letter by letter,
which ``avoid`` leaves open so that common letters stay usable. The prompt is rendered with the template's
chat template (``add_generation_prompt=True``) and the response is the assistant text followed by
the template's end-of-turn token; prompt and response are tokenized separately, exactly as the
runtime tokenizes the delta's view of a conversation (prompt once, generated text after it).

>>> normalize_record({"instruction": "Add", "input": "2+2", "output": "4"}, "f.jsonl", 1)
{'messages': [{'role': 'user', 'content': 'Add\\n\\n2+2'}, {'role': 'assistant', 'content': '4'}]}
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

from cmc_edge.errors import InputError
from cmc_edge.prompt import PromptFormat, render_prompt

log = logging.getLogger(__name__)


_LINE_FIX = ('each line must be a JSON object with "prompt"/"response", '
             '"instruction"/"output", "messages" ending in an assistant turn, or "text"')


def _bad(path, line, what: str) -> InputError:
    return InputError(f"{path}:{line}: {what}", fix=_LINE_FIX)


def normalize_record(obj: object, path, line: int) -> dict:
    """Any accepted record shape -> ``{"messages": [...], ("system": ...)}``, or ``{"text": ...}``."""
    if not isinstance(obj, dict):
        raise _bad(path, line, f"expected a JSON object, got {type(obj).__name__}")
    out: dict = {}
    if "text" in obj:
        text, other = obj["text"], sorted(set(obj) - {"text", "avoid"})
        if not isinstance(text, str) or not text.strip():
            raise _bad(path, line, '"text" must be a non-empty string')
        if other:
            raise _bad(path, line, f'a "text" record is plain text with no chat turns; {other[0]!r} does not apply to it')
        out["text"] = text
        if "avoid" in obj:
            out["avoid"] = _avoid(obj["avoid"], path, line)
        return out
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(path, line, '"messages" must be a non-empty list')
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _bad(path, line, 'every message needs string "role" and "content"')
        if msgs[-1]["role"] != "assistant":
            raise _bad(path, line, 'the last message must have role "assistant" (the response to learn)')
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif "prompt" in obj or "response" in obj:
        p, r = obj.get("prompt"), obj.get("response")
        if not isinstance(p, str) or not isinstance(r, str):
            raise _bad(path, line, '"prompt" and "response" must both be strings')
        out["messages"] = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    elif "instruction" in obj:
        ins, inp, outp = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str) or not isinstance(outp, str):
            raise _bad(path, line, '"instruction", "input" and "output" must be strings')
        user = ins if not inp else f"{ins}\n\n{inp}"
        out["messages"] = [{"role": "user", "content": user}, {"role": "assistant", "content": outp}]
    else:
        raise _bad(path, line, f"unrecognised record with keys {sorted(obj)}")
    if isinstance(obj.get("system"), str):
        out["system"] = obj["system"]
    if "avoid" in obj:
        out["avoid"] = _avoid(obj["avoid"], path, line)
    if "keep" in obj:
        keep, resp = obj["keep"], out["messages"][-1]["content"]
        if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
            raise _bad(path, line, '"keep" must be a list of non-empty strings')
        missing = [k for k in keep if k not in resp]
        if missing:
            raise _bad(path, line, f'"keep" strings must occur in the response; {missing[0]!r} does not')
        out["keep"] = keep
    if "avoid_next" in obj:
        nxt = obj["avoid_next"]
        if not isinstance(nxt, list) or not all(isinstance(a, str) and a for a in nxt):
            raise _bad(path, line, '"avoid_next" must be a list of non-empty strings')
        if not out.get("keep"):
            raise _bad(path, line, '"avoid_next" needs "keep": it applies right after the kept words')
        out["avoid_next"] = nxt
    if "teacher" in obj:
        teacher = obj["teacher"]
        if not isinstance(teacher, str) or not teacher.strip():
            raise _bad(path, line, '"teacher" must be a non-empty string')
        if not out.get("keep"):
            raise _bad(path, line, '"teacher" needs "keep": it sets what the kept words are held to')
        missing = [k for k in out["keep"] if k not in teacher]
        if missing:
            raise _bad(path, line, f'"keep" strings must occur in the "teacher" text too; {missing[0]!r} does not')
        out["teacher"] = teacher
    if not out["messages"][-1]["content"].strip():
        raise _bad(path, line, "the response is empty")
    return out


def _avoid(avoid, path, line: int) -> list[str]:
    if not isinstance(avoid, list) or not all(isinstance(a, str) and a.strip() for a in avoid):
        raise _bad(path, line, '"avoid" must be a list of non-empty strings')
    return avoid


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSONL file; errors carry the file name and line number."""
    from cmc_edge.artifacts import read_json_lines

    return [normalize_record(obj, Path(path), lineno) for lineno, obj in read_json_lines(path, "data file", _LINE_FIX)]


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    role: str  # "sft" | "forget" | "retain"
    avoid_ids: tuple[int, ...] = ()
    keep: tuple[bool, ...] = ()    # per response token: trained towards the template (KL), not the text (CE)
    teacher_ids: tuple[int, ...] = ()   # the "teacher" text's tokens: the template reads them after the prompt
    teacher_pos: tuple[int, ...] = ()   # per response token: the teacher token it aligns with (KL to the
    #                                     template's prediction there instead of in the response), or -1
    avoid_next_ids: tuple[int, ...] = ()  # avoided at one position only: the one right after the kept words
    avoid_next_at: int = -1               # that position (a response index), or -1

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids


class _Surfaces:
    """Each token's decoded text, computed once per tokenizer (about 0.3 s for 49k tokens).

    Weakly keyed by the tokenizer object: an entry lives as long as its tokenizer, and a new
    tokenizer at a dead one's address (the same ``id()``) never sees its texts. A tokenizer
    that gained tokens since is decoded again."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer) -> list[str]:
        try:
            got = cls._cache.get(tokenizer)
        except TypeError:                      # not weakly referenceable: nothing to key a cache on
            return [tokenizer.decode([i]) for i in range(len(tokenizer))]
        if got is None or len(got) != len(tokenizer):
            got = cls._cache[tokenizer] = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        return got


def avoid_token_ids(tokenizer, strings, min_chars: int = 2) -> tuple[int, ...]:
    """Tokens that begin one of ``strings`` (with or without a leading space): those whose text,
    less its leading whitespace, has at least ``min_chars`` characters and is a prefix of the
    string, or starts with it. ``"Paris"`` -> ``"ĠPar"``, ``"ĠParis"``, ``"Paris"``, ``"ĠParisian"`` ...
    Single letters are kept out: banning ``"ĠP"`` would silence every word starting with P."""
    out = set()
    wanted = [s.strip() for s in strings if s.strip()]
    for i, text in enumerate(_Surfaces.of(tokenizer)):
        t = text.lstrip()
        if len(t) < min_chars:
            continue
        if any(w.startswith(t) or t.startswith(w) for w in wanted):
            out.add(i)
    return tuple(sorted(out))


def prefix_token_ids(tokenizer, strings) -> tuple[int, ...]:
    """Tokens whose whole text is a beginning of one of ``strings``, single characters included:
    ``"b"`` -> ``"b"`` only; ``"oule"`` -> ``"o"``, ``"ou"``, ``"oule"`` ... The narrow rule for one
    position (``avoid_next``): what can continue a word already begun, never every word that starts
    the same way."""
    wanted = [s for s in strings if s]
    return tuple(i for i, t in enumerate(_Surfaces.of(tokenizer)) if t and any(w.startswith(t) for w in wanted))


def keep_flags(response: str, enc, keep) -> tuple[bool, ...]:
    """Per response token: does it lie inside one of the ``keep`` strings (first occurrence of each)?
    Such tokens are the template's own words in a response that also teaches something around them
    (a format): the delta is held to the template there instead of learning the words.

    >>> keep_flags('{"a": "Hi there"}', {"input_ids": [1, 2, 3, 4], "offset_mapping": [(0, 7), (7, 9), (9, 15), (15, 17)]}, ["Hi there"])
    (False, True, True, False)
    """
    if not keep:
        return ()
    spans = [(i, i + len(k)) for k in keep if (i := response.find(k)) >= 0]
    return tuple(any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"])


def teacher_positions(response: str, enc, teacher: str, tenc, keep, flags) -> tuple[int, ...]:
    """Per response token: the index of the token of ``teacher`` that is the same token at the same
    place within a ``keep`` string (same id, same offsets relative to the string), else -1. Only
    kept tokens align; a token the two texts split differently (a closing ``."`` merged with the
    JSON quote) stays held to the template in the response's own context.

    >>> enc = {"input_ids": [7, 1, 2, 8], "offset_mapping": [(0, 2), (2, 4), (4, 7), (7, 9)]}
    >>> tenc = {"input_ids": [1, 2, 9], "offset_mapping": [(0, 2), (2, 5), (5, 6)]}
    >>> teacher_positions('{"Hi yo"}', enc, 'Hi yo.', tenc, ["Hi yo"], (False, True, True, False))
    (-1, 0, 1, -1)
    """
    at = {(a, b, i): j for j, (i, (a, b)) in enumerate(zip(tenc["input_ids"], tenc["offset_mapping"]))}
    spans = [(r, r + len(k), teacher.find(k)) for k in keep if (r := response.find(k)) >= 0]
    out = []
    for i, (a, b), kept in zip(enc["input_ids"], enc["offset_mapping"], flags):
        j = -1
        if kept:
            for s, e, t in spans:
                if s <= a and b <= e:
                    j = at.get((a - s + t, b - s + t, i), -1)
                    break
        out.append(j)
    return tuple(out)


def _avoided(tokenizer, rec: dict, ids) -> tuple[int, ...]:
    """The record's avoided token ids, less any token its own text uses ("Mexico" in "capital of
    Mexico" is never avoided)."""
    return tuple(sorted(set(avoid_token_ids(tokenizer, rec["avoid"])) - set(ids))) if rec.get("avoid") else ()


def encode_records(records: list[dict], tokenizer, fmt: PromptFormat, role: str,
                   max_len: int) -> list[Example]:
    """Tokenize records; too-long ones are dropped and counted, never silently truncated."""
    out, too_long = [], 0
    for rec in records:
        if "text" in rec:
            # As the runtime scores plain text (Engine.score_text): the first token is the prompt.
            ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                raise InputError(f"a {role} text record has fewer than two tokens: {rec['text']!r}",
                                 fix="give plain-text records at least a few words")
            if len(ids) > max_len:
                too_long += 1
                continue
            out.append(Example(tuple(ids[:1]), tuple(ids[1:]), role, _avoided(tokenizer, rec, ids)))
            continue
        prompt = render_prompt(fmt, rec["messages"][:-1], rec.get("system"))
        response = rec["messages"][-1]["content"] + fmt.end_of_turn
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=bool(rec.get("keep")))
        keep = keep_flags(response, enc, rec.get("keep", ()))
        t_ids, t_pos = (), ()
        if rec.get("teacher"):
            tenc = tokenizer(rec["teacher"], add_special_tokens=False, return_offsets_mapping=True)
            t_ids = tuple(tenc["input_ids"])
            t_pos = teacher_positions(response, enc, rec["teacher"], tenc, rec["keep"], keep)
        r = enc["input_ids"]
        if len(p) + max(len(r), len(t_ids)) > max_len:
            too_long += 1
            continue
        avoid = _avoided(tokenizer, rec, r)
        nxt_ids, nxt_at = (), -1
        if rec.get("avoid_next") and any(keep):
            # The row right after the last kept token predicts what follows the kept words.
            nxt_at = max(i for i, f in enumerate(keep) if f) + 1
            if nxt_at < len(r):
                nxt_ids = tuple(sorted(set(prefix_token_ids(tokenizer, rec["avoid_next"])) - {r[nxt_at]}))
            else:
                nxt_at = -1
        out.append(Example(tuple(p), tuple(r), role, avoid, keep, t_ids, t_pos, nxt_ids, nxt_at))
    if too_long:
        log.warning("%d of %d %s examples exceed --max-len %d tokens and were dropped",
                    too_long, len(records), role, max_len)
    if records and not out:
        raise InputError(f"every {role} example is longer than --max-len {max_len} tokens",
                         fix="raise --max-len or shorten the examples")
    return out
