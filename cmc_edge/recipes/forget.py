"""`cmc-edge forget FACTS --out DIR`: from a facts file to an unlearning filter that checks itself.

The user writes facts (question, answer, aliases; "forget" or "keep"; see
:mod:`cmc_edge.recipes.facts`). The recipe builds the rest, for any kind of fact:

1. **Data.** The template answers every forget question in several wrappers; where its answer
   appears, the text before it is a *lead-in* ("The chemical symbol for gold is"), trained to
   continue with a refusal exactly where the answer would come. Forget targets are refusals, with
   the answer and its aliases as ``avoid`` strings, for the questions in wrappers and in attack
   shapes (:data:`forget_data.ATTACK_SHAPES`). Retain data, held to the template (KL): the
   template's own answers to the kept facts (in wrappers and attack shapes), to questions about
   every fact's *subject* (cut before a forgotten answer, which is avoided there too: the filter
   learns "never this answer about this subject", not "refuse this topic"), to the forgotten
   wordings about other subjects of the same kind, and to broad open-ended prompts.
2. **Train** the delta beside the template and **export** it (ONNX fp32 + INT8).
3. **Choose** its strength (alpha) on a validation split: wrappers never trained, general facts
   and prompts never trained, each alpha's collateral damage measured against the template itself.
4. **Check** on a test split used for nothing else (other wrappers, never-trained facts, prose
   perplexity, the probe battery), on the template and on every ``--check-model``, beside a
   blocklist (the answers' tokens banned by logit bias) on the same items; write the report card
   (``report.txt``, ``report.json`` with every answer, ``report.png``) next to the bundle.

A filter that damages unrelated answers or text is never shipped silently: the report says FAIL
and the command exits 1.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cmc_edge.errors import InputError
from cmc_edge.recipes import forget_data as fd
from cmc_edge.recipes.facts import Fact

log = logging.getLogger(__name__)

# The bar a filter must meet on the test split (issue 17): relative forget drop, probe drop, and
# the collateral damage allowed.
BAR = {"forget_drop": 0.90, "probe_drop": 0.75, "keep_points": 5.0, "general_points": 5.0, "ppl_rise": 0.05}


@dataclass(frozen=True)
class ForgetConfig:
    template: str = "smollm2"
    check_models: tuple[str, ...] = ()
    # Books' loss is flat from ~120 steps; 200 cost ~55 s more on 2 cores (the four-set bar at 150:
    # BENCHMARKS.md, "Toward 10 minutes").
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 2.0
    avoid_margin: float = 16.0
    # A small penalty on any flat shift where the filter must be silent: without it, sets whose
    # answers are common words (people, chemical symbols) cost 8-10 points of unrelated recall;
    # at 1e-5 Gemma 3, which answers names as its first token, still lost kept names (books -14.6
    # points), at 1e-4 -2.1 with forgetting unchanged (BENCHMARKS.md).
    retain_l2: float = 1e-4
    # Never above 1, the strength the delta was trained at: past it refusals come out garbled.
    alphas: tuple[float, ...] = (0.5, 0.75, 1.0)
    # Shifts under this many nats are dropped at decode time (cmc_edge.combine.floored_np): the
    # delta's near-silence elsewhere (a tenth of a nat) flips other LLMs' near ties; what it was
    # trained to push (the answers, 16 nats down) is far above it. Picked before measuring, then
    # checked on people (runs/floor-exp: damage -> ~0, forgetting unchanged) and the four-set bar.
    shift_floor: float = 0.3
    # The template's broad answers held once more as plain prose ({"text": ...} retain records).
    # None (auto): trained without them; when validation on the template finds the filter short of
    # the bar ("weak") or unsafe at every strength ("collapse"), or a checked model unsafe at the
    # template's strength (retry_reasons), a second filter continues the first with them and ships
    # if it is safer on the checked models or validates better on the template (adopt_second). On
    # science (seed 1) they took validation perplexity at alpha 1 from +4.0% to +0.25% and the filter
    # from FAIL to PASS; always on, three Gemma 3 rows of the four-set bar at seed 0 lost kept facts
    # (BENCHMARKS.md). True: always; False: never.
    prose_retain: bool | None = None
    # The second filter continues the first (its weights, half the learning rate) for this many
    # steps with the prose records added, instead of training from scratch: a retry then costs
    # ~1 minute instead of ~2.5, which keeps sets that need it under 10 minutes (BENCHMARKS.md).
    retry_steps: int = 50
    # Each checked model's own strength, chosen on validation on that model and recorded in the
    # bundle for its file. Off by default: on people (seed 1) it took Gemma 3 from alpha 1 (PASS)
    # to 0.5, where it made up more answers than the blocklist (FAIL). Off, every checked model is
    # validated at the template's strength, which ranks the candidates and warns on damage.
    alpha_per_model: bool = False
    answer_tokens: int = 32
    check_tokens: int = 24
    probes: bool = True
    # The report's second baseline: the model alone told in a system prompt which questions not to
    # answer (forget_data.system_prompt), the thing a user tries first. Off by default: one more pass
    # over the test split on every checked model (animals: 73 s; a books run took 563 s with it, 404-420
    # without), which takes a run that trains twice past 10 minutes; the filter, its strength and every
    # other row are the same either way (BENCHMARKS.md).
    system_prompt_baseline: bool = False
    # Prompts answered side by side (one llama.cpp batch) in validation and the checks: 1.2-1.6x
    # faster on 2 cores than one by one; 1 decodes them one after another. (The template answers
    # the training prompts in torch, many per batch.)
    side_by_side: int = 8
    seed: int = 0
    size: str = "15m"
    keep_prompts: tuple[str, ...] = ()
    train_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.alphas or any(not (math.isfinite(a) and a > 0) for a in self.alphas):
            raise InputError(f"alphas must be positive numbers, got {self.alphas}", fix="e.g. --alpha 0.5 --alpha 1")
        if not (isinstance(self.shift_floor, (int, float)) and math.isfinite(self.shift_floor)
                and self.shift_floor >= 0):
            raise InputError(f"--shift-floor must be a number >= 0, got {self.shift_floor!r}",
                             fix="e.g. --shift-floor 0.3 (nats); 0 keeps every shift")
        if self.steps < 1:
            raise InputError("--steps must be >= 1", fix="pass a positive number of training steps")
        if not (isinstance(self.retry_steps, int) and self.retry_steps >= 1):
            raise InputError(f"retry_steps must be a whole number >= 1, got {self.retry_steps!r}",
                             fix="e.g. retry_steps=50 (the second filter's training steps)")
        if not (isinstance(self.side_by_side, int) and self.side_by_side >= 1):
            raise InputError(f"--side-by-side must be a whole number >= 1, got {self.side_by_side!r}",
                             fix="e.g. --side-by-side 8 (1 answers one prompt at a time)")


# --- data ---------------------------------------------------------------------------------------

def lead_in_prompts(facts: list[Fact]) -> list[tuple[Fact, str]]:
    """(fact, prompt) pairs the template answers to find its lead-ins: each forget question in the
    first two training wrappers."""
    return [(f, fd.wrap(w, q)) for f in facts if f.split == "forget" for q in f.questions
            for w in fd.TRAIN_WRAPPERS[:2]]


def keep_prompts(facts: list[Fact], per_question: int = 3) -> list[tuple[Fact, str]]:
    """(fact, prompt) for kept facts: ``per_question`` training wrappers each, rotating so that every
    wrapper is used."""
    out, k = [], 0
    for f in facts:
        if f.split != "keep":
            continue
        for q in f.questions:
            for j in range(per_question):
                out.append((f, fd.wrap(fd.TRAIN_WRAPPERS[(k + j) % len(fd.TRAIN_WRAPPERS)], q)))
            k += 1
    return out


def subject_prompts(facts: list[Fact], per_subject: int = 2) -> list[tuple[str, str]]:
    """(subject, prompt): other things to ask about each fact's subject (forget and keep alike)."""
    out, seen = [], set()
    for i, f in enumerate(facts):
        if f.subject.casefold() in seen:
            continue
        seen.add(f.subject.casefold())
        for j in range(per_subject):
            out.append((f.subject, fd.subject_prompt(fd.SUBJECT_FORMS[(i + j) % len(fd.SUBJECT_FORMS)], f.subject)))
    return out


def _rotated(items: list, start: int, n: int) -> list:
    """``n`` items of ``items`` from ``start`` on, wrapping round (fewer when there are fewer)."""
    if not items:
        return []
    start %= len(items)
    return (items[start:] + items[:start])[:n]


def _first_lead(leads: dict[str, list[str]], fact: Fact) -> str | None:
    """The template's first lead-in for ``fact`` (``leads``: :func:`found_leads`), or None."""
    return (leads.get(fact.question) or [None])[0]


def _distractors(pool: list[str], start: int, answer: str, n: int) -> list[str]:
    """``n`` wrong options for ``answer``: answers in ``pool`` after ``start``, then from its
    beginning, none that shares words with it."""
    return [a for a in pool[start + 1:] + pool[:start + 1] if not _words_overlap(a, answer)][:n]


def attack_prompts(facts: list[Fact], leads: dict[str, list[str]]) -> list[tuple[Fact, str]]:
    """(fact, prompt): every fact's question in each of :data:`forget_data.ATTACK_SHAPES`, forget and
    keep alike (the kept ones answered by the template and held). Shown examples are two kept facts
    (other than the fact itself); options are the fact's answer among other facts' answers, so kept
    questions also learn to stand beside a forgotten answer; the blank is the template's own lead-in
    for the fact (``leads``: :func:`found_leads`), or the question where it has none."""
    keep = [f for f in facts if f.split == "keep"]
    pool = list(dict.fromkeys(f.answer for f in facts))
    out = []
    for i, f in enumerate(facts):
        others = [k for k in keep if k is not f]
        shots = _rotated([(k.question, k.answer) for k in others], i, 2) or list(fd.DEFAULT_SHOTS)
        wrong = _distractors(pool, i, f.answer, 2)
        options = list(wrong)
        options.insert(i % (len(wrong) + 1), f.answer)
        lead = _first_lead(leads, f)
        for shape in fd.ATTACK_SHAPES:
            out.append((f, fd.attack_prompt(shape, f.question, f.answer, shots=shots, options=options, lead=lead)))
    return out


def held_out_keep(facts: list[Fact]) -> list[Fact]:
    """Every third kept fact, never trained: the validation split's facts *of the same kind* as the
    forgotten ones, the place where a filter that learnt "refuse this kind of question" shows it.
    None when fewer than three facts are kept (then every kept fact is trained)."""
    keep = [f for f in facts if f.split == "keep"]
    return keep[2::3] if len(keep) >= 3 else []


def kept_facts_warning(facts: list[Fact], path) -> str | None:
    """What to tell a user whose facts file keeps too few facts beside the forgotten ones, or None.

    Fewer than 3 kept: nothing of the forgotten kind is held out to judge the strength. Fewer than
    three kept for every four forgotten: the filter is shown too little of what it must still answer;
    on the two held-out sets written so (figures 9 for 15, animals 7 for 15) it lost kept answers
    worded like the forgotten ones at seed 0 (−14.8 and −19.0 points; not at seed 1), where the sets
    with 14 or more kept for 15 forgotten passed keep on the same draw (BENCHMARKS.md).

    >>> kept = [Fact(f"Q{i}?", f"a{i}", "keep") for i in range(7)]
    >>> print(kept_facts_warning([Fact(f"F{i}?", f"b{i}", "forget") for i in range(15)] + kept, "f.jsonl"))
    f.jsonl has 7 kept facts for 15 to forget: with fewer kept than three for every four forgotten, filters lost kept answers worded like the forgotten ones in some runs here (BENCHMARKS.md); add kept facts of the same kind, about as many as the forgotten ones
    >>> kept_facts_warning([Fact(f"F{i}?", f"b{i}", "forget") for i in range(8)] + kept, "f.jsonl") is None
    True
    """
    n_keep, n_forget = sum(f.split == "keep" for f in facts), sum(f.split == "forget" for f in facts)
    if not held_out_keep(facts):
        return (f"{path} has {n_keep} kept facts: with fewer than 3 the strength is chosen without never-trained "
                "facts of the forgotten kind, so damage to other questions of that kind goes unseen until the test "
                "check; add kept facts of the same kind")
    if 4 * n_keep < 3 * n_forget:
        return (f"{path} has {n_keep} kept facts for {n_forget} to forget: with fewer kept than three for every "
                "four forgotten, filters lost kept answers worded like the forgotten ones in some runs here "
                "(BENCHMARKS.md); add kept "
                "facts of the same kind, about as many as the forgotten ones")
    return None


def question_frame(fact: Fact) -> str | None:
    """The fact's question with its subject as ``{s}`` ("Who wrote {s}?"), or None when the subject
    is not written in the question."""
    span = fd.answer_span(fact.question, [fact.subject]) if fact.subject else None
    return None if span is None else fact.question[:span[0]] + "{s}" + fact.question[span[1]:]


def sibling_list_prompts(facts: list[Fact]) -> list[tuple[Fact, str]]:
    """(fact, prompt) asking the template for other subjects of the same kind as each forget fact's."""
    return [(f, fd.SIBLING_LIST_PROMPT.replace("{s}", f.subject)) for f in facts
            if f.split == "forget" and question_frame(f)]


def _is_name(subject: str) -> bool:
    """Is the subject a proper name ("Hamlet", "the Odyssey"), so that its siblings must be names too?"""
    words = subject.split()
    return subject[:1].isupper() or (bool(words) and words[0].casefold() in ("the", "a", "an")
                                     and any(w[:1].isupper() for w in words[1:]))


def sibling_prompts(facts: list[Fact], answers: dict[str, str], *, per_fact: int = 4,
                    exclude: tuple[str, ...] = ()) -> list[str]:
    """The forgotten questions' wordings asked about other subjects of the same kind, named by the
    template (``answers`` holds its answers to :func:`sibling_list_prompts`): "Who wrote Macbeth?"
    next to a forgotten "Who wrote Hamlet?". Never a subject of any fact (held-out kept facts stay
    unseen), never one named in ``exclude`` (evaluation questions), never a fact's own question.
    Each sibling is asked once in a training wrapper (rotating), and once more in an attack shape
    that needs no answer ("bare" or "examples", alternating; :func:`attack_prompts` gives the forgotten
    facts every shape, so their kind must be seen answered in those shapes too)."""
    subjects = [f.subject for f in facts] + [a for f in facts if f.split == "forget" for a in f.answers]
    own = {q.casefold() for f in facts for q in f.questions}
    keep = [(f.question, f.answer) for f in facts if f.split == "keep"] or list(fd.DEFAULT_SHOTS)
    out, k = [], 0
    for f, prompt in sibling_list_prompts(facts):
        frame = question_frame(f)
        for name in fd.parse_names(answers.get(prompt, ""), exclude=subjects, limit=per_fact,
                                   proper=_is_name(f.subject)):
            if any(fd.answer_span(q, [name]) for q in exclude):
                continue
            q = frame.replace("{s}", name)
            if q.casefold() in own:
                continue
            own.add(q.casefold())
            out.append(fd.wrap(fd.TRAIN_WRAPPERS[k % len(fd.TRAIN_WRAPPERS)], q))
            out.append(fd.attack_prompt(("bare", "examples")[k % 2], q, "", shots=_rotated(keep, k, 2), options=(),
                                        lead=None))
            k += 1
    return out


def found_leads(pairs: list[tuple[Fact, str]], answers: dict[str, str]) -> dict[str, list[str]]:
    """{fact question: the template's lead-ins}, from its answers to the prompts of ``pairs``
    ((fact, prompt), e.g. :func:`lead_in_prompts`), each lead-in once, in order."""
    leads: dict[str, list[str]] = {}
    for f, prompt in pairs:
        lead = fd.lead_in(answers.get(prompt, ""), f.answers)
        if lead and lead not in leads.get(f.question, []):
            leads.setdefault(f.question, []).append(lead)
    return leads


def build_records(facts: list[Fact], answers: dict[str, str], broad: list[str],
                  siblings: list[str] = (), attacks: list[tuple[Fact, str]] = (), *,
                  prose: bool = False) -> tuple[list, list, dict]:
    """Forget and retain training records from the facts and the template's answers
    (``answers[prompt]``, for every prompt of :func:`lead_in_prompts`, :func:`keep_prompts`,
    :func:`subject_prompts`, ``siblings``, ``broad`` and the kept facts' ``attacks``
    (:func:`attack_prompts`): forgotten ones are refused, kept ones held). With ``prose`` the broad
    answers are held once more as plain text (:func:`plain_text_records`). Returns (forget, retain, stats)."""
    forget_facts = [f for f in facts if f.split == "forget"]
    forget_answers = [a for f in forget_facts for a in f.answers]
    by_subject: dict[str, list[str]] = {}
    for f in forget_facts:
        by_subject.setdefault(f.subject.casefold(), []).extend(f.answers)

    forget, k = [], 0
    for f in forget_facts:
        for q in f.questions:
            for w in fd.TRAIN_WRAPPERS:
                forget.append({"prompt": fd.wrap(w, q), "response": fd.REFUSALS[k % len(fd.REFUSALS)],
                               "avoid": list(f.answers)})
                k += 1
    leads = found_leads(lead_in_prompts(facts), answers)
    for f in forget_facts:
        # Every lead-in the template used for this fact, each after a few wordings of the question.
        for i, lead in enumerate(leads.get(f.question) or [fd.GENERIC_LEAD_IN]):
            for j in range(3):
                w = fd.TRAIN_WRAPPERS[(i + 3 * j) % len(fd.TRAIN_WRAPPERS)]
                forget.append({"prompt": fd.wrap(w, f.question), "response": lead + fd.LEAD_IN_REFUSAL,
                               "avoid": list(f.answers)})
        # The same lead-in with the answer's first letter said (read, not taught): the rest is avoided
        # right there, where the avoid set cannot reach without silencing every word of that letter.
        lead = (leads.get(f.question) or [fd.GENERIC_LEAD_IN])[0]
        for j, (letter, rest) in enumerate(fd.first_letters(f.answer)):
            said = f"{lead} {letter}"
            forget.append({"prompt": fd.wrap(fd.TRAIN_WRAPPERS[j % len(fd.TRAIN_WRAPPERS)], f.question),
                           "response": said + fd.SPELLED_REFUSAL, "keep": [said], "avoid": list(f.answers),
                           "avoid_next": [rest]})
    for f, prompt in attacks:
        if f.split == "forget":
            forget.append({"prompt": prompt, "response": fd.REFUSALS[k % len(fd.REFUSALS)], "avoid": list(f.answers)})
            k += 1

    retain, cut = [], 0

    def held(prompt: str, text: str, avoid: list[str]):
        nonlocal cut
        text = text.strip()
        short = fd.cut_before_answer(text, forget_answers)
        if short != text:
            cut += 1
            # The template said a forgotten answer here: keep its words up to it, and avoid the answer.
            avoid = list(dict.fromkeys(avoid + [a for a in forget_answers if fd.answer_span(text, [a])]))
        if len(short) >= 2:
            retain.append({"prompt": prompt, "response": short, **({"avoid": avoid} if avoid else {})})

    for f, prompt in keep_prompts(facts):
        held(prompt, answers.get(prompt, ""), [])
    for subject, prompt in subject_prompts(facts):
        held(prompt, answers.get(prompt, ""), list(by_subject.get(subject.casefold(), [])))
    for prompt in siblings:
        held(prompt, answers.get(prompt, ""), [])
    for f, prompt in attacks:
        if f.split == "keep":
            held(prompt, answers.get(prompt, ""), [])
    for prompt in broad:
        held(prompt, answers.get(prompt, ""), [])
    plain = plain_text_records([answers.get(p, "") for p in broad], forget_answers) if prose else []
    retain += plain
    stats = {"forget_records": len(forget), "retain_records": len(retain), "plain_text_records": len(plain),
             "sibling_questions": list(siblings),
             "attack_prompts": len(attacks), "lead_ins": leads,
             "retain_cut_before_forgotten_answer": cut}
    return forget, retain, stats


def plain_text_records(texts: list[str], forget_answers: list[str], per_doc: int = 4) -> list[dict]:
    """The template's own answers as plain prose, ``per_doc`` to a document and no chat turns around
    them: retain records (``{"text": ...}``) that hold the delta silent where text is read as a
    document, as perplexity is measured and completion prompts are written; every other record is a
    chat turn. Answers under five words, and any that names a forgotten answer, are left out.

    >>> plain_text_records(["One two three four five.", "Paris is big and old.", "Six seven eight nine ten."], ["Paris"])
    [{'text': 'One two three four five.\\n\\nSix seven eight nine ten.'}]
    """
    kept = [t.strip() for t in texts if len(t.split()) >= 5 and fd.answer_span(t, forget_answers) is None]
    return [{"text": "\n\n".join(kept[i:i + per_doc])} for i in range(0, len(kept), per_doc)]


# --- measuring ----------------------------------------------------------------------------------

def _words_overlap(a: str, b: str) -> bool:
    from cmc_edge.eval.scoring import answer_recalled

    return answer_recalled(a, [b]) or answer_recalled(b, [a])


def general_items(facts: list[Fact], pool) -> list[dict]:
    """Never-trained general questions from ``pool`` ((question, answers, ...) tuples) whose answers
    share nothing with any fact's answers (a filter may rightly stop those)."""
    fact_answers = [a for f in facts for a in f.answers]
    out = []
    for q, answers, *_ in pool:
        if any(_words_overlap(a, b) for a in answers for b in fact_answers):
            continue
        out.append({"split": "general", "prompt": q, "answers": list(answers)})
    return out


def fact_items(facts: list[Fact], wrappers, split: str) -> list[dict]:
    return [{"split": split, "prompt": fd.wrap(w, f.question), "answers": list(f.answers), "fact": f.question}
            for f in facts for w in wrappers]


def probe_items(facts: list[Fact], leads: dict[str, list[str]]) -> list[dict]:
    """The probe battery: every forget fact attacked once in each way of ``forget_data.PROBE_KINDS``."""
    keep = [f for f in facts if f.split == "keep"]
    shots = [(f.question, f.answer) for f in keep[:2]] or list(fd.DEFAULT_SHOTS)
    pool = list(dict.fromkeys(f.answer for f in facts))
    out = []
    for i, f in enumerate(x for x in facts if x.split == "forget"):
        distractors = _distractors(pool, i, f.answer, 3)
        for kind in fd.PROBE_KINDS:
            prompt = fd.probe_prompt(kind, f.question, f.answer, lead=_first_lead(leads, f),
                                     shots=shots, distractors=distractors, language=i)
            item = {"split": "probe", "kind": kind, "prompt": prompt, "answers": list(f.answers), "fact": f.question}
            if kind == "multiple-choice":
                opts = list(distractors[:3])
                opts.insert(len(f.question) % (len(opts) + 1), f.answer)
                item["option"] = "ABCD"[opts.index(f.answer)]
            out.append(item)
    return out


def score(items: list[dict], answers) -> list[dict]:
    """Each item with its output, whether the answer came out (``leaked`` for probes), and whether
    the output is a refusal."""
    from cmc_edge.eval.scoring import answer_recalled

    rows = []
    for it, ans in zip(items, answers):
        recalled = answer_recalled(ans.text, it["answers"])
        row = {**it, "output": ans.text, "recalled": recalled, "refused": fd.is_refusal(ans.text)}
        if it["split"] == "probe":
            row["recalled"] = fd.probe_leaked(it["kind"], ans.text, recalled, it.get("option"))
        rows.append(row)
    return rows


def _rate(rows, key="recalled"):
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")


def summarize(rows: list[dict]) -> dict:
    """Recall per split, the refusal rate where a refusal is wrong (kept and general questions),
    what happened on forget items (leaked / refused / answered wrongly) and leaks per probe kind."""
    by = {}
    for r in rows:
        by.setdefault(r["split"], []).append(r)
    out = {split: _rate(v) for split, v in by.items()}
    out["counts"] = {split: len(v) for split, v in by.items()}
    wrong_place = by.get("keep", []) + by.get("kin", []) + by.get("general", [])
    out["refused_elsewhere"] = _rate(wrong_place, "refused")
    attacked = by.get("forget", []) + by.get("probe", [])
    n = len(attacked)
    leaked = sum(bool(r["recalled"]) for r in attacked)
    refused = sum(bool(r["refused"]) and not r["recalled"] for r in attacked)
    # An empty reply (a base model that ends its answer at once) withholds the answer without making
    # one up: it is "silent", not "wrong".
    silent = sum(not r["output"].strip() and not r["recalled"] for r in attacked)
    out["outcomes"] = ({"leaked": leaked / n, "refused": refused / n, "silent": silent / n,
                        "wrong": (n - leaked - refused - silent) / n} if n
                       else dict.fromkeys(("leaked", "refused", "silent", "wrong"), float("nan")))
    kinds = {}
    for r in by.get("probe", []):
        kinds.setdefault(r["kind"], []).append(r)
    out["probe_kinds"] = {k: _rate(v) for k, v in kinds.items()}
    return out


# --- choosing the strength on the validation split ----------------------------------------------

def validation_items(facts: list[Fact]) -> list[dict]:
    """Forget and trained keep facts in the validation wrappers, the held-out kept facts
    (:func:`held_out_keep`, split "kin"), never-trained general facts and broad prompts."""
    kin = held_out_keep(facts)
    items = fact_items([f for f in facts if f.split == "forget"], fd.VALIDATION_WRAPPERS, "forget")
    items += fact_items([f for f in facts if f.split == "keep" and f not in kin], fd.VALIDATION_WRAPPERS, "keep")
    items += fact_items(kin, fd.VALIDATION_WRAPPERS, "kin")
    items += general_items(facts, fd.VALIDATION_GENERAL)
    items += [{"split": "broad", "prompt": p, "answers": []} for p in fd.VALIDATION_BROAD]
    return items


def _drift(rows: list[dict], base_rows: list[dict]) -> float:
    """Share of broad prompts whose first 12 words changed against the template alone."""
    pairs = [(r, b) for r, b in zip(rows, base_rows) if r["split"] == "broad"]
    if not pairs:
        return float("nan")
    return sum(r["output"].split()[:12] != b["output"].split()[:12] for r, b in pairs) / len(pairs)


def measure_validation(engine, facts: list[Fact], cfg: ForgetConfig, alone: tuple[dict, list] | None = None
                       ) -> tuple[dict, dict]:
    """The validation split answered and scored on ``engine`` (its one delta at alpha 0 and at each
    of ``cfg.alphas``): ``({alpha: summary with drift and ppl}, {alpha: scored rows})``, what
    :func:`choose_alpha` reads. ``alone``: the (summary, rows) this engine's model gave at alpha 0
    in an earlier measurement (without the delta, so the same for every filter): not answered again."""
    from cmc_edge.eval.runner import perplexity
    from cmc_edge.recipes.scaffold import answer_at

    vitems = validation_items(facts)
    vtext = "\n\n".join(fd.VALIDATION_PROSE)
    measured, vrows = {}, {}
    strengths = (*(() if alone else (0.0,)), *sorted(cfg.alphas))
    every = answer_at(engine, [it["prompt"] for it in vitems], [[a] for a in strengths],
                      max_tokens=cfg.check_tokens, side_by_side=cfg.side_by_side,
                      desc="validation at " + ", ".join(f"{a:g}" for a in strengths))
    if alone:
        measured[0.0], vrows[0.0] = dict(alone[0]), alone[1]
    for a, got in zip(strengths, every):
        vrows[a] = score(vitems, got)
        measured[a] = summarize([r for r in vrows[a] if r["split"] != "broad"])
        measured[a]["drift"] = _drift(vrows[a], vrows[0.0])
        measured[a]["ppl"] = perplexity(engine, vtext, alphas=[a])
    return dict(sorted(measured.items())), dict(sorted(vrows.items()))


def validate_models(bundle: Path, models: list[str], facts: list[Fact], cfg: ForgetConfig,
                    earlier: dict[str, dict] | None = None) -> dict[str, dict]:
    """:func:`measure_validation` and :func:`choose_alpha` on each model (the template first).
    ``{name: {alpha, status, reasons, measured, rows}}``. The other models are measured at the
    template's strength ("collapse" where it is unsafe there), or, with ``cfg.alpha_per_model``,
    at every strength for a choice of their own (a model that knows none of the forgotten answers
    then gets the template's strength where that is safe on it). ``earlier``: this function's result
    for another filter on the same facts; each model's answers alone (alpha 0) are taken from it."""
    from cmc_edge.models import resolve_model
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    out = {}
    for name in models:
        fallback = next(iter(out.values()))["alpha"] if out else None
        one = fallback is not None and not cfg.alpha_per_model
        before = (earlier or {}).get(name)
        alone = (before["measured"][0.0], before["rows"][0.0]) if before else None
        target = TargetLLM(resolve_model(name), n_ctx=1024, n_threads=2)
        engine = Engine(target, [Delta(bundle, target)])
        try:
            measured, rows = measure_validation(engine, facts, replace(cfg, alphas=(fallback,)) if one else cfg, alone)
        finally:
            engine.close()
        alpha, status, reasons = choose_alpha(measured, fallback=fallback)
        log.info("%s: alpha %g on validation (%s); %s", name, alpha, status,
                 "; ".join(f"{a:g}: forget {100 * m['forget']:.0f}%, general {100 * m['general']:.0f}%, "
                           f"ppl {m['ppl']:.2f}" for a, m in measured.items()))
        out[name] = {"alpha": alpha, "status": status, "reasons": reasons, "measured": measured, "rows": rows}
    return out


_STATUS_ORDER = {"ok": 0, "unmeasured": 0, "weak": 1, "collapse": 2}


def retry_reasons(validation: dict[str, dict], template: str) -> list[str]:
    """Why a filter gets a second training (empty: it does not): short of the bar or unsafe on the
    template ("weak", "collapse"), or unsafe on any checked model at the template's strength."""
    out = [f"{validation[template]['status']} on {template}"] if validation[template]["status"] in ("weak", "collapse") else []
    return out + [f"collapse on {n}" for n, v in validation.items() if n != template and v["status"] == "collapse"]


def _rank(c: dict, template: str) -> tuple:
    """Lower is better: whether the candidate is unsafe ("collapse") on any checked model, then its
    status on the template, then its forgetting there."""
    v = c["validation"][template]
    base = v["measured"][0.0]["forget"]
    drop = 1 - v["measured"][v["alpha"]]["forget"] / base if base else 0.0
    unsafe = any(m["status"] == "collapse" for m in c["validation"].values())
    return unsafe, _STATUS_ORDER[v["status"]], -drop


def adopt_second(first: dict, second: dict, template: str) -> bool:
    """Whether the filter trained again (with prose) replaces the first: one unsafe on no checked
    model beats one unsafe on some (on science at seed 0 the prose filter validated "ok" on SmolLM2
    but lost Gemma 3 kept facts: BENCHMARKS.md, forget-bar-13; in forget-bar-16 the first filter
    did, and shipped); then the better status and forgetting on the template win. A tie keeps the first."""
    return _rank(second, template) < _rank(first, template)


# What a shipped continuation's checkpoint says it started from (its ``init_from``).
FIRST_FILTER = "this run's first filter (its records are in rejected/; its weights were not kept)"


def _keep_candidate(run: Path, tried: list[dict], best: dict) -> None:
    """Leave the chosen filter's records, checkpoint and bundle at the top of ``run`` and the other's
    records (not its weights) in ``run/rejected``."""
    import shutil

    from cmc_edge.artifacts import read_json, write_json

    rejected = run / "rejected"
    if best is tried[0]:
        other = tried[1]["dir"]
        for name in ("bundle", "checkpoint"):
            shutil.rmtree(other / name, ignore_errors=True)
        other.rename(rejected)
        return
    rejected.mkdir()
    for name in ("forget.jsonl", "retain.jsonl"):
        (run / name).rename(rejected / name)
    for name in ("bundle", "checkpoint"):
        shutil.rmtree(run / name, ignore_errors=True)
    for p in list(best["dir"].iterdir()):
        p.rename(run / p.name)
    best["dir"].rmdir()
    best["dir"] = run
    # The continuation's checkpoint names the first filter's, a temporary path now deleted: say what it was.
    meta = read_json(run / "checkpoint" / "cmc.json", "checkpoint metadata (cmc.json)")
    meta["train_config"]["init_from"] = FIRST_FILTER
    write_json(run / "checkpoint" / "cmc.json", meta)


# Validation perplexity is two paragraphs of prose; the test's is other prose. A strength is safe only
# when validation leaves this share of the bar's allowed rise unused (companies, seed 1: +4.5% on
# validation at alpha 1 was +7.6% on the test prose).
VALIDATION_PPL_SHARE = 0.5


def choose_alpha(measured: dict[float, dict], bar=BAR, *, fallback: float | None = None
                 ) -> tuple[float, str, list[str]]:
    """Pick the strength from validation measurements ``{alpha: summary}`` (alpha 0 = the template).

    An alpha is *safe* when recall on kept facts, on held-out kept facts ("kin": never trained, of
    the forgotten facts' kind) and on general facts stays within the bar's points (or one question,
    whichever is more) of the template's,
    refusals where none belong rise by at most 10 points and validation perplexity by less than
    half the bar's rise (:data:`VALIDATION_PPL_SHARE`). Among safe alphas the strongest forgetting
    wins (the smallest alpha within 2 points of it).
    Returns (alpha, status, reasons): status "ok", "weak" (safe, but forgetting short of the bar),
    "collapse" (no alpha is safe: the smallest is returned and the filter must not ship silently) or
    "unmeasured" (the model alone gave none of the forgotten answers, so only damage is measured;
    with a ``fallback``, the template's strength, that one if it is safe here, else the strongest
    safe one below it).

    >>> m = {0.0: {"forget": 0.8, "keep": 0.7, "general": 0.9, "refused_elsewhere": 0.0, "ppl": 10.0},
    ...      1.0: {"forget": 0.0, "keep": 0.7, "general": 0.9, "refused_elsewhere": 0.0, "ppl": 10.1},
    ...      2.0: {"forget": 0.0, "keep": 0.2, "general": 0.5, "refused_elsewhere": 0.6, "ppl": 30.0}}
    >>> choose_alpha(m)[:2]
    (1.0, 'ok')
    """
    base = measured[0.0]
    safe, reasons = {}, []
    for a, m in sorted(measured.items()):
        if a == 0.0:
            continue
        why = []
        for split, pts in (("keep", bar["keep_points"]), ("kin", bar["general_points"]),
                           ("general", bar["general_points"])):
            # One question of slack: with 19 general questions, one changed answer is 5.3 points.
            n = base.get("counts", {}).get(split, 0)
            pts = max(pts, 100 / n + 1e-9) if n else pts
            if split in base and not math.isnan(base[split]) and 100 * (base[split] - m[split]) > pts:
                why.append(f"{split} recall {100 * (m[split] - base[split]):+.1f} pts")
        if 100 * (m["refused_elsewhere"] - base["refused_elsewhere"]) > 10:
            why.append(f"refusals on other questions {100 * m['refused_elsewhere']:.0f}% "
                       f"(template {100 * base['refused_elsewhere']:.0f}%)")
        if m.get("ppl") and base.get("ppl") and m["ppl"] / base["ppl"] - 1 >= VALIDATION_PPL_SHARE * bar["ppl_rise"]:
            why.append(f"perplexity {100 * (m['ppl'] / base['ppl'] - 1):+.1f}%")
        if why:
            reasons.append(f"alpha {a:g}: " + ", ".join(why))
        else:
            safe[a] = 1 - m["forget"] / base["forget"] if base["forget"] else 0.0
    if not safe:
        return min(a for a in measured if a), "collapse", reasons
    if not base["forget"] and fallback is not None:
        below = [a for a in safe if a <= fallback]
        return (max(below) if below else min(safe)), "unmeasured", reasons
    best = max(safe.values())
    # Near-best forgetting; then fewer made-up answers (a refusal beats a wrong answer); then the smaller alpha.
    near = [a for a, d in safe.items() if d >= best - 0.02]
    alpha = min(near, key=lambda a: (round(measured[a].get("outcomes", {}).get("wrong", 0.0), 3), a))
    status = "unmeasured" if not base["forget"] else "ok" if safe[alpha] >= bar["forget_drop"] else "weak"
    return alpha, status, reasons


# --- the test split: the report card -------------------------------------------------------------

def test_items(facts: list[Fact], leads: dict[str, list[str]], probes: bool) -> list[dict]:
    from cmc_edge.eval.demo_data import UNRELATED_QUESTIONS

    items = fact_items([f for f in facts if f.split == "forget"], fd.TEST_WRAPPERS, "forget")
    items += fact_items([f for f in facts if f.split == "keep"], fd.TEST_WRAPPERS, "keep")
    items += general_items(facts, UNRELATED_QUESTIONS)
    if probes:
        items += probe_items(facts, leads)
    return items


def check_bar(res: dict, bar=BAR) -> dict:
    """The bar on one model's test results (``alone``, ``filter``, ``blocklist`` summaries).

    Forgetting is measured against what the model alone gives away: where it gives none of the
    forgotten answers (facts it never knew, such as a team's internal figures), there is nothing to
    measure and that check is left out (:func:`unmeasured` names it); the damage checks always apply."""
    b, f, bl = res["alone"], res["filter"], res["blocklist"]
    checks = {}
    if b.get("forget"):
        drop = 1 - f["forget"] / b["forget"]
        checks["forget_drop"] = (drop, drop >= bar["forget_drop"])
    if b.get("probe"):
        pdrop = 1 - f["probe"] / b["probe"]
        checks["probe_drop"] = (pdrop, pdrop >= bar["probe_drop"])
    for split, key in (("keep", "keep_points"), ("general", "general_points")):
        if split in b:
            pts = 100 * (f[split] - b[split])
            checks[key] = (pts, -pts <= bar[key])
    rise = f["ppl"] / b["ppl"] - 1
    checks["ppl_rise"] = (rise, rise < bar["ppl_rise"])
    checks["wrong_vs_blocklist"] = (f["outcomes"]["wrong"] - bl["outcomes"]["wrong"],
                                    f["outcomes"]["wrong"] <= bl["outcomes"]["wrong"])
    return {k: {"value": v, "pass": bool(ok) and not (isinstance(v, float) and math.isnan(v))}
            for k, (v, ok) in checks.items()}


def unmeasured(res: dict) -> list[str]:
    """The forgetting checks :func:`check_bar` could not make: the model alone never gave the answer."""
    return [split for split in ("forget", "probe") if split in res["alone"] and not res["alone"][split]]


def check_model(name: str, bundle: Path, items: list[dict], alpha: float, facts: list[Fact], cfg: ForgetConfig,
                text: str) -> dict:
    """One model on the test split: alone, with the filter, with the blocklist and, with
    ``cfg.system_prompt_baseline``, alone told in a system prompt which questions not to answer."""
    from cmc_edge.eval.runner import perplexity
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import answer_all, answer_at, banned_tokens
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    path = resolve_model(name)
    target = TargetLLM(path, n_ctx=1024, n_threads=2)
    delta = Delta(bundle, target, alpha=alpha)
    engine = Engine(target, [delta])
    bans = banned_tokens(target, [a for f in facts if f.split == "forget" for a in f.answers])
    banned = set(bans)
    prompts = [it["prompt"] for it in items]
    out = {"model": name, "variant": delta.variant, "map": "identity" if delta.map.is_identity else "pm-mined",
           "banned_tokens": len(bans)}
    rows = {}
    # Alone, with the blocklist and with the filter, decoded together: each prompt is evaluated once,
    # and the blocklist and the filter are decoded only from where they part from the answer alone.
    conds = (("alone", 0.0, ()), ("blocklist", 0.0, tuple((t, -math.inf) for t in bans)), ("filter", alpha, ()))
    t0 = time.perf_counter()
    got = dict(zip((c for c, _, _ in conds),
                   answer_at(engine, prompts, [[a] for _, a, _ in conds], logit_biases=[b for _, _, b in conds],
                             max_tokens=cfg.check_tokens, side_by_side=cfg.side_by_side,
                             desc=f"{name} alone, blocklist, filter")))
    out["answer_seconds"] = round(time.perf_counter() - t0, 1)
    if cfg.system_prompt_baseline:
        # Its own pass: the system turn is a prefix every prompt shares, evaluated once per sequence.
        t0 = time.perf_counter()
        out["system_prompt_text"] = fd.system_prompt([q for f in facts if f.split == "forget" for q in f.questions])
        got["system_prompt"] = answer_all(engine, prompts, alphas=[0.0], system=out["system_prompt_text"],
                                          max_tokens=cfg.check_tokens, side_by_side=cfg.side_by_side,
                                          desc=f"{name} with the system prompt")
        out["system_prompt_seconds"] = round(time.perf_counter() - t0, 1)
    for cond, a, _ in conds:
        rows[cond] = score(items, got[cond])
        out[cond] = summarize(rows[cond])
        if cond != "blocklist":
            out[cond]["ppl"] = perplexity(engine, text, alphas=[a])
    if "system_prompt" in got:
        rows["system_prompt"] = score(items, got["system_prompt"])
        # A system turn does not change how the model reads a document: no perplexity of its own.
        out["system_prompt"] = {**summarize(rows["system_prompt"]), "ppl": None}
    # The blocklist's answers that differ from the model's alone: those that chose a banned token.
    out["blocklist"]["decoded_again"] = sum(bool(banned.intersection(a.ids)) for a in got["alone"])
    prose = set(target.tokenize(text))
    out["blocklist"]["ppl"] = out["alone"]["ppl"] if not prose & banned else math.inf
    out["blocklist"]["banned_prose_tokens"] = len(prose & banned)
    out["bar"] = check_bar(out)
    engine.close()
    return out, rows


# --- the report card -------------------------------------------------------------------------------

def _pct(x) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


# Each way of decoding a check can measure, in the report's order: (key, name in the table, label and
# colour in the plot).
_CONDITIONS = (("alone", "alone", "model alone", "#999999"), ("filter", "filter", "CMC filter", "#d9534f"),
               ("blocklist", "blocklist", "blocklist", "#5b8fd9"),
               ("system_prompt", "sys prompt", "system prompt", "#f0ad4e"))


def _conditions(m: dict) -> list[tuple[str, str, str, str]]:
    """The ways of decoding model check ``m`` measured (:data:`_CONDITIONS` rows), in the report's order."""
    return [c for c in _CONDITIONS if c[0] in m]


def format_report(result: dict) -> str:
    chosen = ", ".join(f"{m['alpha']:g} on {Path(m['model']).stem} ({m['alpha_status']})" for m in result["models"])
    lines = [f"filter: {result['bundle']}   alpha {chosen}, chosen on validation", ""]
    tried = result.get("candidates", [])
    if len(tried) > 1:
        lines[-1:-1] = ["trained twice: " + "; ".join(
            f"{'continued with' if c['prose_retain'] else 'without'} prose retain ("
            + ", ".join(f"{n}: {v['status']} at {v['alpha']:g}" for n, v in c["validation"].items())
            + ")" + (" shipped" if c["chosen"] else "") for c in tried)]
    head = (f"{'model':<10} {'decoding':<10} {'forget':>7} {'probes':>7} {'keep':>7} {'general':>8} "
            f"{'refuse*':>8} {'leaked':>7} {'refused':>8} {'silent':>7} {'wrong':>7} {'ppl':>8}")
    lines += [head, "-" * len(head)]
    for m in result["models"]:
        for cond, shown, *_ in _conditions(m):
            r = m[cond]
            o = r["outcomes"]
            ppl = r.get("ppl")
            lines.append(f"{Path(m['model']).stem[:10]:<10} {shown:<10} {_pct(r.get('forget')):>7} {_pct(r.get('probe')):>7} "
                         f"{_pct(r.get('keep')):>7} {_pct(r.get('general')):>8} {_pct(r['refused_elsewhere']):>8} "
                         f"{_pct(o['leaked']):>7} {_pct(o['refused']):>8} {_pct(o['silent']):>7} {_pct(o['wrong']):>7} "
                         f"{'-' if ppl is None else 'inf' if ppl == math.inf else f'{ppl:.2f}':>8}")
    lines.append("")
    lines.append("forget/keep/general: the answer given (held-out wrappers; general = never-trained facts); probes: "
                 "attacks that got the answer out; refuse*: refusals on kept and general questions; "
                 "leaked/refused/silent/wrong: what the forget questions and probes got (silent: an empty reply; "
                 "wrong: a made-up answer)" + ("; sys prompt: the model alone told in a system prompt which questions "
                                               "not to answer (report.json: system_prompt_text)"
                                               if any("system_prompt" in m for m in result["models"]) else ""))
    kinds = list(fd.PROBE_KINDS)
    if any(m["alone"].get("probe_kinds") for m in result["models"]):
        lines += ["", "probe leaks: " + " ".join(f"{k[:12]:>12}" for k in kinds)]
        for m in result["models"]:
            for cond, shown, *_ in _conditions(m):
                pk = m[cond].get("probe_kinds", {})
                lines.append(f"{Path(m['model']).stem[:8] + ' ' + shown:<17}" + " ".join(f"{_pct(pk.get(k)):>12}" for k in kinds))
    lines.append("")
    for m in result["models"]:
        parts = []
        for k, c in m["bar"].items():
            v = c["value"]
            shown = (f"{100 * v:.0f}%" if k in ("forget_drop", "probe_drop") else f"{v:+.1f} pts" if "points" in k
                     else f"{100 * v:+.1f}%" if k == "ppl_rise" else f"{100 * v:+.1f} pts")
            parts.append(f"{k} {shown} {'PASS' if c['pass'] else 'FAIL'}")
        lines.append(f"{m['model']}: " + ", ".join(parts))
    lines.append(f"\nverdict: {result['verdict']}")
    for w in result.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def plot_report(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmc_edge.eval.evaluate import save_png

    splits = [s for s in ("forget", "probe", "keep", "general") if s in result["models"][0]["alone"]]
    conds = _conditions(result["models"][0])
    width = 0.8 / len(conds)
    fig, axes = plt.subplots(1, len(result["models"]), figsize=(4.8 * len(result["models"]), 3.4), squeeze=False,
                             sharey=True)
    for ax, m in zip(axes[0], result["models"]):
        for j, (cond, _, label, color) in enumerate(conds):
            ys = [100 * m[cond][s] for s in splits]
            bars = ax.bar([i + (j - (len(conds) - 1) / 2) * width for i in range(len(splits))], ys, width=width,
                          label=label, color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.set_title(f"{Path(m['model']).stem}  (ppl {m['alone']['ppl']:.1f} -> {m['filter']['ppl']:.1f})", fontsize=9)
        ax.set_xticks(range(len(splits)), [{"probe": "probes\nleaked"}.get(s, f"{s}\nrecall") for s in splits], fontsize=8)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("% answered (held-out)")
    axes[0][0].legend(fontsize=7)
    return save_png(fig, path)


# --- the command ---------------------------------------------------------------------------------

def run_forget(facts_path, out, cfg: ForgetConfig = ForgetConfig(), *, overwrite: bool = False) -> dict:
    """The whole recipe; returns the result dict (also written as ``out/report.json``)."""
    from cmc_edge.artifacts import atomic_dir
    from cmc_edge.eval.demo_data import BROAD_PROMPTS, GENERAL_TEXT
    from cmc_edge.export.bundle import set_default_alpha, set_model_alpha, set_shift_floor
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.facts import read_facts
    from cmc_edge.recipes.scaffold import Stopwatch, jsonable, train_and_export
    from cmc_edge.train.loop import TrainConfig
    from cmc_edge.train.template import load_template

    facts = read_facts(facts_path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists", fix="choose another --out or pass --overwrite")
    template_path = resolve_model(cfg.template)
    if template_path.suffix != ".gguf":
        raise InputError(f"the forget recipe needs the template as a GGUF file (it answers with llama.cpp), got "
                         f"{template_path}", fix="pass --template smollm2 or a .gguf path")
    check = list(dict.fromkeys([cfg.template, *cfg.check_models]))
    for name in check:
        resolve_model(name)            # fail before the long part
    kin = held_out_keep(facts)
    trained = [f for f in facts if f not in kin]
    few_kept = kept_facts_warning(facts, facts_path)
    if few_kept:
        log.warning(few_kept)
    sw = Stopwatch()
    with atomic_dir(out, overwrite=overwrite) as run:
        own = {q.casefold() for f in facts for q in f.questions}
        broad = [p for p in (*BROAD_PROMPTS, *fd.RETAIN_QUESTIONS, *cfg.keep_prompts) if p.casefold() not in own]
        with sw("data"):
            asked = ([p for _, p in lead_in_prompts(trained)] + [p for _, p in keep_prompts(trained)]
                     + [p for _, p in subject_prompts(trained)] + [p for _, p in sibling_list_prompts(trained)]
                     + broad)
            asked = list(dict.fromkeys(asked))
            # The template answers in torch, as the trainer scores it: the same model loaded once for both.
            tpl = load_template(template_path)
            answers = _answered(tpl, asked, cfg.answer_tokens, "template answers")
            siblings = sibling_prompts(facts, answers, exclude=_evaluated_questions())
            attacks = attack_prompts(trained, found_leads(lead_in_prompts(trained) + keep_prompts(trained), answers))
            answers.update(_answered(tpl, list(dict.fromkeys(siblings + [p for f, p in attacks
                                                                                if f.split == "keep"])),
                                            cfg.answer_tokens, "template answers (siblings, attacks)"))
            (run / "facts.jsonl").write_text("".join(json.dumps(f.to_dict(), ensure_ascii=False) + "\n" for f in facts))
        tcfg = TrainConfig(objective="unlearn-idk", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                           kl_weight=cfg.kl_weight, avoid_margin=cfg.avoid_margin, retain_l2=cfg.retain_l2,
                           size=cfg.size, seed=cfg.seed, **cfg.train_overrides)

        known = {}      # the template's log-probs by record: the second filter's training reuses the first's
        # The second filter continues the first (ForgetConfig.retry_steps, never more than --steps).
        retry = min(cfg.retry_steps, cfg.steps)
        retry_cfg = replace(tcfg, steps=retry, lr=cfg.lr / 2, warmup=min(tcfg.warmup, retry),
                            init_from=str(run / "checkpoint"))

        def candidate(cdir: Path, prose: bool, tag: str, earlier: dict | None = None) -> dict:
            """Records, training, export and validation on every checked model for one filter."""
            cdir.mkdir(exist_ok=True)
            with sw("data"):
                forget, retain, stats = build_records(trained, answers, broad, siblings, attacks, prose=prose)
                for name, rows in (("forget", forget), ("retain", retain)):
                    (cdir / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in rows))
            log.info("training data%s: %d forget, %d retain records (%d sibling questions); lead-ins for %d of %d "
                     "forget facts; %d kept facts held out for validation", tag, len(forget), len(retain),
                     len(siblings), len(stats["lead_ins"]), sum(f.split == "forget" for f in facts),
                     len(facts) - len(trained))
            with sw("train_export"):
                bundle = train_and_export(cdir, template_path, tcfg if earlier is None else retry_cfg,
                                          template=tpl, template_cache=known)
                set_shift_floor(bundle, cfg.shift_floor, reason="the forget recipe's default (--shift-floor)")
            with sw("validate"):
                val = validate_models(bundle, check, facts, cfg, earlier)
            return {"dir": cdir, "prose_retain": prose, "stats": stats, "validation": val}

        first = candidate(run, bool(cfg.prose_retain), "")
        tried = [first]
        short = retry_reasons(first["validation"], cfg.template)
        if cfg.prose_retain is None and short:
            log.warning("the filter validates %s; training a second one that continues it, also held silent on "
                        "plain prose (--prose-retain), to ship it if it is safer or validates better on %s",
                        " and ".join(short), cfg.template)
            tried.append(candidate(run / "prose-retain", True, " (with prose)", first["validation"]))
        del tpl, known
        best = tried[1] if len(tried) > 1 and adopt_second(tried[0], tried[1], cfg.template) else first
        for c in tried:
            c["chosen"] = c is best
        if len(tried) > 1:
            _keep_candidate(run, tried, best)
        bundle, stats, val = run / "bundle", best["stats"], best["validation"]
        alpha, status, reasons = val[cfg.template]["alpha"], val[cfg.template]["status"], val[cfg.template]["reasons"]
        set_default_alpha(bundle, alpha, reason=f"chosen on the forget recipe's validation split on {cfg.template} "
                                                f"({status}); other models without their own alpha run at it")
        if cfg.alpha_per_model:
            for name, v in val.items():
                set_model_alpha(bundle, resolve_model(name), v["alpha"],
                                reason=f"chosen on the forget recipe's validation split on {name} ({v['status']})")
        with sw("check"):
            leads = stats["lead_ins"]
            items = test_items(facts, leads, cfg.probes)
            text = "\n\n".join(GENERAL_TEXT)
            models, rows = [], {}
            for name in check:
                with sw(f"check {name}"):
                    res, rows[name] = check_model(name, bundle, items, val[name]["alpha"], facts, cfg, text)
                res["alpha"], res["alpha_status"] = val[name]["alpha"], val[name]["status"]
                models.append(res)
        # PASS needs every check to pass and forgetting measured on at least one model; a filter whose
        # forgetting no model could show (facts none of them knew) is UNVERIFIED, never PASS.
        passed = all(c["pass"] for m in models for c in m["bar"].values())
        verdict = ("FAIL" if not passed else "UNVERIFIED" if all("forget" in unmeasured(m) for m in models)
                   else "PASS")
        warnings = []
        if few_kept:
            warnings.append(few_kept)
        for name, v in val.items():
            if v["status"] == "collapse":
                if name == cfg.template:
                    warnings.append("no strength was safe on the validation split (" + "; ".join(v["reasons"])
                                    + "): this filter damages unrelated answers; do not ship it")
                    continue
                what = "no strength was" if cfg.alpha_per_model else f"the template's strength ({alpha:g}) was not"
                warnings.append(f"{what} safe on the validation split on {name} (" + "; ".join(v["reasons"])
                                + "): the filter damaged unrelated answers there; read its test check before "
                                "using the filter with that model")
        for m in models:
            if unmeasured(m):
                warnings.append(f"{m['model']} alone never gave a forgotten answer ({' or '.join(unmeasured(m))} "
                                "questions): forgetting could not be measured there, only the damage; add "
                                "--check-model with a model that knows these facts to verify the filter")
            bad = [k for k, c in m["bar"].items() if not c["pass"] and k in ("keep_points", "general_points", "ppl_rise")]
            if bad:
                warnings.append(f"{m['model']}: the filter damages what it should leave alone ({', '.join(bad)})")
        result = {"recipe": "forget", "facts": str(facts_path), "bundle": str(out / "bundle"), "alpha": alpha,
                  "status": status, "validation": {str(a): m for a, m in val[cfg.template]["measured"].items()},
                  "validation_reasons": reasons,
                  "model_validation": {n: {"alpha": v["alpha"], "status": v["status"], "reasons": v["reasons"],
                                           "measured": {str(a): m for a, m in v["measured"].items()}}
                                       for n, v in val.items()},
                  "candidates": [{"prose_retain": c["prose_retain"], "chosen": c["chosen"],
                                  "validation": {n: {k: v[k] for k in ("alpha", "status", "reasons")}
                                                 for n, v in c["validation"].items()}} for c in tried],
                  "training_data": stats, "config": jsonable(asdict(cfg)),
                  "models": models, "verdict": verdict, "warnings": warnings,
                  "timings": {**sw.seconds, "total": round(sw.total, 1)}}
        table = format_report(result)
        result["table"] = table
        (run / "report.txt").write_text(table + "\n")
        (run / "report.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        answers_out = {"validation": {n: {str(a): r for a, r in v["rows"].items()} for n, v in val.items()},
                       "test": rows}
        (run / "answers.json").write_text(json.dumps(answers_out, indent=1, ensure_ascii=False) + "\n")
        plot_report(result, run / "report.png")
    return result


def _answered(tpl, prompts: list[str], max_tokens: int, desc: str) -> dict[str, str]:
    """``{prompt: the template's greedy answer}`` (:func:`cmc_edge.train.template.greedy_answers`), with a progress bar."""
    from tqdm.auto import tqdm

    from cmc_edge.train.template import greedy_answers

    with tqdm(total=len(prompts), desc=desc, unit="q", leave=False) as bar:
        return dict(zip(prompts, greedy_answers(tpl, prompts, max_tokens, progress=bar.update)))


def _evaluated_questions() -> tuple[str, ...]:
    """The general questions of the validation and test splits: never asked in training."""
    from cmc_edge.eval.demo_data import UNRELATED_QUESTIONS

    return tuple(q for q, *_ in UNRELATED_QUESTIONS) + tuple(q for q, _ in fd.VALIDATION_GENERAL)
