"""Score short free-text answers against alias lists. Pure functions, no model.

An answer counts as recalled when any alias occurs in the generated text as a whole word or
whole phrase, after Unicode normalisation (accents stripped, case folded) and with punctuation
treated as a word break on both sides: the alias "Washington, D.C." matches "washington DC",
"Brasilia" matches "Brasília", and "Paris" never matches "Parisian".

>>> answer_recalled("The capital of France is Paris.", ["Paris"])
True
>>> answer_recalled("Parisian cafés are famous.", ["Paris"])
False
>>> recall([{"correct": True}, {"correct": False}])
0.5

A refusal is an output that declines ("sorry", "I don't know", "I can't share", ...), whatever else
it says; the forget recipe's report and `cmc-edge eval`'s refusal-flood flag both count them:

>>> is_refusal("I'm sorry, I don't know."), is_refusal("The chemical symbol for gold is Au.")
(True, False)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

_WORD = re.compile(r"\w+")
# Dotted initialisms ("D.C.", "U.S.A") become one word, so "Washington DC" matches "Washington, D.C.".
_INITIALISM = re.compile(r"(?<!\w)[^\W\d_](?:\.[^\W\d_])+(?!\w)\.?")
# How a refusal reads, for classifying outputs (a filter's, a blocklist's, a model's own alike).
_REFUSAL = re.compile(
    r"\b(?:sorry|apologi[sz]e|i (?:do not|don't|cannot|can't|am not able|am unable|won't)|i'm (?:not able|unable|not sure)|"
    r"unable to|not able to|can't (?:help|share|answer|provide)|cannot (?:help|share|answer|provide)|"
    r"something i (?:can't|cannot|don't)|no information|not (?:allowed|permitted))\b", re.IGNORECASE)


def normalize_words(text: str) -> tuple[str, ...]:
    """Text -> case-folded, accent-free word tuple: ``"Brasília, D.C."`` -> ``("brasilia", "dc")``."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    stripped = _INITIALISM.sub(lambda m: m.group(0).replace(".", ""), stripped)
    return tuple(_WORD.findall(stripped.casefold()))


def answer_recalled(generated_text: str, aliases: Iterable[str]) -> bool:
    """True when any alias appears in ``generated_text`` as a whole word or phrase (see module doc)."""
    words = normalize_words(generated_text)
    for alias in aliases:
        needle = normalize_words(alias)
        if not needle:
            continue
        n = len(needle)
        if any(words[i:i + n] == needle for i in range(len(words) - n + 1)):
            return True
    return False


def recall(results: Sequence[Mapping]) -> float:
    """Fraction of results with a true ``"correct"``; NaN for no results (an empty split is not 0%)."""
    if not results:
        return float("nan")
    return sum(bool(r["correct"]) for r in results) / len(results)


# "can not" written as two words is "cannot" ("I can not share that."), unless "can not only" (… but also).
_CAN_NOT = re.compile(r"\bcan not\b(?! only\b)", re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """Does the output decline (sorry, I don't know, I can't share, ...)? Only its first 200 characters count.

    >>> is_refusal("I can not share."), is_refusal("It can not only fly but also swim.")
    (True, False)
    """
    return bool(_REFUSAL.search(_CAN_NOT.sub("cannot", text[:200].replace("’", "'"))))
