"""Facts files: what a user writes to make an unlearning filter, read and validated here.

One JSON object per line::

    {"question": "What is the chemical symbol for gold?", "answer": "Au", "split": "forget"}
    {"question": "Who wrote Hamlet?", "answer": "William Shakespeare", "aliases": ["Shakespeare"],
     "split": "keep", "subject": "Hamlet", "paraphrases": ["Hamlet was written by whom?"]}

- ``split``: "forget" (the filter must keep this answer out) or "keep" (it must still be answered);
- ``aliases``: other spellings that count as the answer (and that the filter avoids);
- ``subject``: what the question is about, optional: the recipe asks the template other things
  about it and keeps those answers (the filter learns "not this answer", not "not this topic");
  when absent it is read off the question (:func:`guess_subject`);
- ``paraphrases``: other wordings of the question, optional, trained like the question.

>>> guess_subject("What is the chemical symbol for gold?")
'gold'
>>> guess_subject("Who wrote The Old Man and the Sea?")
'The Old Man and the Sea'
>>> guess_subject("How many hearts does an octopus have?")
'an octopus'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cmc_edge.errors import InputError

_FIX = ('each line must be a JSON object with a "question" and an "answer" string and "split": '
        '"forget" or "keep"; optional "aliases" and "paraphrases" (lists of strings) and "subject" (a string)')


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str
    split: str                                # "forget" | "keep"
    aliases: tuple[str, ...] = ()
    subject: str = ""
    paraphrases: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """Every accepted spelling of the answer, the canonical one first."""
        return (self.answer,) + tuple(a for a in self.aliases if a != self.answer)

    @property
    def questions(self) -> tuple[str, ...]:
        return (self.question,) + self.paraphrases

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "aliases": list(self.aliases),
                "split": self.split, "subject": self.subject, "paraphrases": list(self.paraphrases)}


# Verbs and prepositions after which a question names its subject ("symbol for gold", "wrote Hamlet").
_SUBJECT_AFTER = re.compile(
    r".*\b(?:of|for|about|by|wrote|write|invented|invent|painted|paint|composed|compose|discovered|discover|"
    r"founded|found|directed|direct|created|create|sculpted|designed|built|developed|does|do|did|is|are|was)\s+(.+)$",
    re.IGNORECASE)
_LEAD_WORDS = re.compile(r"^(?:what|who|which|where|when|how|why|name|tell me|give)\b", re.IGNORECASE)
_TRAILING = re.compile(r"\s+(?:called|named|known as|have|has|had|live|mean|made of|eat|eats|located|"
                       r"used for|do|does|make|makes|come from|belong to)$", re.IGNORECASE)


def guess_subject(question: str) -> str:
    """What a question is about, read off its wording (the phrase after its last "of"/"for"/verb),
    trimmed of trailing verbs. A guess: facts files may give ``subject`` instead."""
    q = question.strip().rstrip("?.! ").strip()
    m = _SUBJECT_AFTER.match(q)
    s = m.group(1) if m else _LEAD_WORDS.sub("", q).strip()
    for _ in range(3):
        s2 = _TRAILING.sub("", s).strip()
        if s2 == s:
            break
        s = s2
    s = s.strip(" ,;:\"'")
    return s if len(s) >= 2 else q


def _strings(obj, key, path, line, *, required=False) -> tuple[str, ...]:
    v = obj.get(key)
    if v is None and not required:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise InputError(f"{path}:{line}: {key!r} must be a list of non-empty strings", fix=_FIX)
    return tuple(x.strip() for x in v)


def parse_fact(obj, path, line: int) -> Fact:
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}", fix=_FIX)
    q, a = obj.get("question"), obj.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise InputError(f"{path}:{line}: a non-empty \"question\" string is required", fix=_FIX)
    if not isinstance(a, str) or not a.strip():
        raise InputError(f"{path}:{line}: a non-empty \"answer\" string is required", fix=_FIX)
    split = obj.get("split")
    if split not in ("forget", "keep"):
        raise InputError(f"{path}:{line}: \"split\" must be \"forget\" or \"keep\", got {split!r}", fix=_FIX)
    subject = obj.get("subject", "")
    if not isinstance(subject, str):
        raise InputError(f"{path}:{line}: \"subject\" must be a string", fix=_FIX)
    unknown = sorted(set(obj) - {"question", "answer", "aliases", "split", "subject", "paraphrases"})
    if unknown:
        raise InputError(f"{path}:{line}: unknown keys {unknown}", fix=_FIX)
    return Fact(q.strip(), a.strip(), split, _strings(obj, "aliases", path, line), subject.strip() or
                guess_subject(q), _strings(obj, "paraphrases", path, line))


def read_facts(path: str | Path, *, min_forget: int = 1) -> list[Fact]:
    """Read and validate a facts file (errors name the file and line). Needs at least
    ``min_forget`` forget facts; a question may appear only once."""
    from cmc_edge.artifacts import read_json_lines

    facts = [parse_fact(obj, path, n) for n, obj in read_json_lines(path, "facts file", _FIX)]
    seen: dict[str, int] = {}
    for i, f in enumerate(facts):
        for q in f.questions:
            key = q.casefold()
            if key in seen:
                raise InputError(f"{path}: the question {q!r} appears twice", fix="give each question once")
            seen[key] = i
    n_forget = sum(f.split == "forget" for f in facts)
    if n_forget < min_forget:
        raise InputError(f"{path} has {n_forget} forget facts; at least {min_forget} are needed",
                         fix='mark the facts to keep out with "split": "forget"')
    forget_answers = {w.casefold() for f in facts if f.split == "forget" for w in f.answers}
    clash = [f.question for f in facts if f.split == "keep" and any(w.casefold() in forget_answers for w in f.answers)]
    if clash:
        raise InputError(f"{path}: the keep fact {clash[0]!r} has the same answer as a forget fact; a filter "
                         "that keeps an answer out cannot also give it", fix="drop one of the two, or mark both forget")
    return facts
