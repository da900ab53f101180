"""`cmc-edge demo --recipe instruct`: an instruction-following delta, trained once beside SmolLM2.

The paper's first use of CMC: instruction tuning done once, carried to other LLMs at decode time.
What is taught is the *kind* of constraint IFEval checks (case, commas, an end phrase, quotation
marks, a postscript, a title, JSON, highlighted phrases, a bullet count, a paragraph count, sections,
a sentence or word limit, repeating the request), on tasks of our own and with our own wordings.
No IFEval prompt, and nothing close to one, is training data (a test checks the overlap).

The data is the template's own answer, edited by rule to follow the constraint and kept only when
IFEval's checker (:mod:`cmc_edge.eval.instructions`, the ``if-verifiable`` package) accepts it:

* each task alone, each task with an instruction the recipe does not teach (:data:`UNTAUGHT`), and
  broad writing prompts, with the template's answer as it is: ``retain`` (KL to the template), so
  the delta stays silent when nothing it was taught is asked;
* each task with one or two constraints appended, with the edited answer: ``sft`` (cross-entropy).
  Where the edit keeps the template's words they are held by KL too; only the format is learnt.

One task in five is held out: its constrained prompts (new task, seen kinds of constraint) judge
each model with and without the delta, by the same checker, and its plain and untaught prompts
count the answers that show a taught format nobody asked for (:func:`unasked_formats`). IFEval
itself is run by ``bench/ifeval.py`` on the bundle this recipe writes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmc_edge.recipes.scaffold import RecipeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstructConfig(RecipeConfig):
    train_overrides: dict = field(default_factory=lambda: {"delta_ends_turn": True})
    per_task: int = 4              # constrained prompts per training task
    answer_tokens: int = 120       # the template's answer to each task
    max_tokens: int = 200          # the check's answers
    max_len: int = 256
    # The template's words in the edited answers held by KL (weight kl_weight), only the format learnt
    # by CE: with CE on whole answers SmolLM2 + delta fell from 20 to 5% on IFEval's 20-prompt subset,
    # answering other questions than asked (runs/instruct/instruct-20261202-020802).
    keep_words: bool = True
    kl_weight: float = 3.0
    side_by_side: int = 8          # prompts answered at once (template answers and the check)
    # The layout the delta reads and is trained in. "chat": the template's chat format; the delta
    # learns only what sets the edited answers apart from the template's own (formats). "qa": the
    # plain Question/Answer layout a base model is asked in; the template read that way behaves
    # more like a base model, and the delta also learns its chat answers (retain records become
    # cross-entropy), the instruct-tuning a base model lacks. Measured once, and worse: Gemma 3 base
    # answered 88 of IFEval's 120 subset prompts with nothing, 0.8% loose against 11.7% alone
    # (BENCHMARKS.md, IFEval, 2026-12-04). Kept as an option for the next try, not the default.
    delta_layout: str = "chat"

    def __post_init__(self):
        if self.delta_layout not in ("chat", "qa"):
            from cmc_edge.errors import InputError

            raise InputError(f"unknown delta_layout {self.delta_layout!r}", fix='use "chat" or "qa"')

    def train_config(self, **extra):
        return super().train_config(max_len=self.max_len, **extra)


# Open-ended tasks of our own, each with a short title (used by the title constraint).
TASKS: tuple[tuple[str, str], ...] = (
    ("Explain how a bicycle stays upright while moving.", "Balance on Two Wheels"),
    ("Describe what a beekeeper does during a normal week.", "A Week with the Bees"),
    ("Tell me why bread goes stale.", "Stale Bread"),
    ("Give some advice to someone learning to swim as an adult.", "Swimming Later in Life"),
    ("Explain what a rainbow is made of.", "Colours in the Sky"),
    ("Describe a quiet morning in a fishing village.", "Morning at the Harbour"),
    ("Suggest ways to keep a small apartment tidy.", "A Tidy Home"),
    ("Explain how a refrigerator keeps food cold.", "Inside the Fridge"),
    ("Tell me about the life cycle of a frog.", "From Egg to Frog"),
    ("Describe how to plant a tomato seedling.", "Planting Tomatoes"),
    ("Explain why the ocean is salty.", "Salt in the Sea"),
    ("Give tips for a first visit to a public library.", "Your First Library Visit"),
    ("Describe the job of an air traffic controller.", "Guiding the Planes"),
    ("Explain what causes thunder.", "The Sound of Lightning"),
    ("Tell me how to make a simple cup of tea.", "A Cup of Tea"),
    ("Describe what people do at a farmers' market.", "Market Day"),
    ("Explain how glasses help people see better.", "Seeing Clearly"),
    ("Suggest a few hobbies for a rainy weekend.", "Rainy Weekend Hobbies"),
    ("Explain why cats purr.", "The Purring Cat"),
    ("Describe how a letter travels through the post.", "A Letter's Journey"),
    ("Tell me about the benefits of walking every day.", "Daily Walks"),
    ("Explain how a compass works.", "Finding North"),
    ("Describe a busy train station at rush hour.", "Rush Hour"),
    ("Give advice on caring for a houseplant.", "Happy Houseplants"),
    ("Explain what a volcano is.", "Mountains of Fire"),
    ("Describe how honey is made.", "From Flower to Honey"),
    ("Tell me how to prepare for a job interview.", "Interview Ready"),
    ("Explain why leaves are green.", "Green Leaves"),
    ("Describe the sounds of a forest at night.", "The Night Forest"),
    ("Suggest ways to save water at home.", "Saving Water"),
    ("Explain how an airplane gets off the ground.", "Taking Off"),
    ("Describe what a lighthouse keeper used to do.", "Keeper of the Light"),
    ("Tell me why sleep matters for students.", "Sleep and Study"),
    ("Explain how recycling paper works.", "Paper Again"),
    ("Describe a picnic in a city park.", "Picnic in the Park"),
    ("Give tips for writing a thank-you note.", "Saying Thanks"),
    ("Explain what the moon's phases are.", "Phases of the Moon"),
    ("Describe how a baker starts the day.", "The Baker's Morning"),
    ("Tell me how to clean a pair of running shoes.", "Clean Running Shoes"),
    ("Explain why we have seasons.", "Why Seasons Change"),
    ("Describe what a museum guide does.", "Guide to the Museum"),
    ("Suggest healthy snacks for a long car trip.", "Road Trip Snacks"),
    ("Explain how a battery stores energy.", "Energy in a Battery"),
    ("Describe a snowy day from a child's point of view.", "Snow Day"),
    ("Tell me how birds find their way when they migrate.", "Long Flights Home"),
    ("Explain what a budget is and why it helps.", "Making a Budget"),
    ("Describe the smell and sounds of a bakery.", "Inside a Bakery"),
    ("Give advice for someone moving to a new town.", "A New Town"),
    ("Explain how vaccines train the body.", "Training the Immune System"),
    ("Describe a sunset over the desert.", "Desert Sunset"),
    ("Tell me how to start running as a beginner.", "First Steps in Running"),
    ("Explain why some metals rust.", "Rust"),
    ("Describe what happens at a car wash.", "Through the Car Wash"),
    ("Suggest ways to make new friends at work.", "Friends at Work"),
    ("Explain how a seed becomes a tree.", "From Seed to Tree"),
    ("Describe a rainy afternoon in a cafe.", "Afternoon Rain"),
    ("Tell me how to fold a paper airplane.", "Paper Airplanes"),
    ("Explain what makes a good neighbour.", "Good Neighbours"),
    ("Describe how a potter shapes a bowl.", "At the Potter's Wheel"),
    ("Give tips for keeping a pet dog healthy.", "A Healthy Dog"),
)


# -- sentences of the template's answer ----------------------------------------------------------------
def sentences(text: str) -> list[str]:
    """The complete sentences of a template answer, markdown and line structure dropped (the
    constraints below rebuild structure; stray ``*`` or ``#`` would break their counts). A last
    sentence cut off by the token budget is left out.

    >>> sentences("**Tip:** water it.\\n* Keep it warm! Then it gr")
    ['Tip: water it.', 'Keep it warm!']
    """
    flat = re.sub(r"\s+", " ", re.sub(r"(^|\s)\d+\.\s", " ", re.sub(r"[*#_`]", "", text))).strip()
    parts = re.findall(r"[^.!?]*[.!?]+(?=\s|$)", flat)
    return [p.strip() for p in parts if len(p.strip()) > 1]


# -- the constraints ----------------------------------------------------------------------------------
# The end phrase is copied from the prompt, so it is drawn from many: with six, the delta learnt the
# phrases themselves and wrote them where nobody asked (IFEval, runs/ifeval/*-full.json).
END_PHRASES = ("That is all for now.", "Hope this is useful!", "Thanks for reading.", "Have a lovely day.",
               "Let me know what you think.", "Enjoy!", "Good luck with it.", "Until next time.", "Happy learning!",
               "That covers the basics.", "Take care.", "Best wishes to you.", "See you soon.", "Onward!",
               "The end.", "Cheers!", "Stay curious.", "All the best.", "Over and out.", "More soon.",
               "Thank you for asking.", "Try it and see.")

# Instructions this recipe does not teach, our own wordings: each training task is also asked with one
# of them, and the template's answer is held by KL (retain), so the delta learns to stay silent where
# a prompt asks for something it was not taught, instead of adding a taught format nobody asked for.
UNTAUGHT = ("Keep a cheerful tone.", "Explain it the way you would to a ten-year-old.",
            "Mention one common mistake people make.", "Include a small everyday example.",
            "Be practical and specific.", "Write it for a school newsletter.", "Say something about safety too.",
            "Focus on the single most important point.", "Sound like a friendly neighbour.",
            "Add a fun fact if you know one.", "Imagine you are talking to a tourist.",
            "Compare it with something familiar.")


@dataclass(frozen=True)
class Rule:
    """One kind of verifiable constraint: its IFEval instruction id (the checker's), how a prompt
    asks for it (our own wordings, ``{name}`` filled from its kwargs), its kwargs for a task, and the
    edit that makes an answer (a list of sentences) follow it (None: this answer cannot)."""

    id: str
    slot: str                        # at most one rule per slot in a prompt
    wordings: tuple[str, ...]
    kwargs: Callable[[random.Random, str, str, list[str]], dict]
    edit: Callable[[list[str], dict, str, str], "list[str] | str | None"]


def _none(rng, task, title, sents):
    return {}


def _groups(sents: list[str], n: int) -> list[list[str]] | None:
    if len(sents) < n:
        return None
    size, extra = divmod(len(sents), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (k < extra)
        out.append(sents[i:j])
        i = j
    return out


def _bullets(s, kw, task, title):
    return None if len(s) < kw["num_bullets"] else "\n".join(f"* {x}" for x in s[: kw["num_bullets"]])


def _paragraphs(s, kw, task, title):
    g = _groups(s, kw["num_paragraphs"])
    return None if g is None else "\n\n***\n\n".join(" ".join(p) for p in g)


def _sections(s, kw, task, title):
    g = _groups(s, kw["num_sections"])
    return None if g is None else "\n\n".join(f"{kw['section_spliter']} {k}\n{' '.join(p)}"
                                              for k, p in enumerate(g, 1))


def _highlights(s, kw, task, title):
    n = kw["num_highlights"]
    return None if len(s) < n else [f"*{x}*" if i < n else x for i, x in enumerate(s)]


def _fewer_sentences(s, kw, task, title):
    keep = s[: kw["num_sentences"] - 1]
    return keep or None


def _fewer_words(s, kw, task, title):
    out, words = [], 0
    for x in s:
        if words + len(x.split()) >= kw["num_words"]:
            break
        out.append(x)
        words += len(x.split())
    return out or None


def _postscript(s, kw, task, title):
    """The template's last sentence moved into the postscript: the delta learns the marker, and the
    postscript's words are the template's own (kept), never a fixed text it could repeat unasked."""
    return None if len(s) < 2 else " ".join(s[:-1]) + f"\n\n{kw['postscript_marker']} " + s[-1]


def _keywords(rng, task, title, sents):
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{6,}", " ".join(sents))})
    return {"keywords": rng.sample(words, 2)} if len(words) >= 2 else {"keywords": []}


RULES: tuple[Rule, ...] = (
    Rule("change_case:english_lowercase", "case",
         ("Use only lowercase letters in your whole reply.",
          "Please write the answer entirely in small letters; no capitals anywhere, not even at the start."),
         _none, lambda s, kw, t, ti: " ".join(s).lower()),
    Rule("change_case:english_capital", "case",
         ("Write your whole reply in capital letters.", "Answer in ALL CAPS, every single letter uppercase."),
         _none, lambda s, kw, t, ti: " ".join(s).upper()),
    Rule("punctuation:no_comma", "punct",
         ("Do not use a single comma in your reply.", "Avoid commas entirely; use other punctuation instead."),
         _none, lambda s, kw, t, ti: [re.sub(r"\s*,\s*", " ", x) for x in s]),
    Rule("startend:end_checker", "end",
         ('Finish with the exact words "{end_phrase}" and write nothing after them.',
          'The last words of your answer must be: {end_phrase}'),
         lambda rng, t, ti, s: {"end_phrase": rng.choice(END_PHRASES)},
         lambda s, kw, t, ti: " ".join(s) + "\n\n" + kw["end_phrase"]),
    Rule("detectable_content:postscript", "end",
         ("Add a note at the very end that starts with {postscript_marker}",
          "After your answer, include a short postscript beginning with {postscript_marker}"),
         lambda rng, t, ti, s: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}, _postscript),
    Rule("startend:quotation", "wrap",
         ("Put your entire reply inside double quotation marks.", "Wrap the whole answer in double quotes."),
         _none, lambda s, kw, t, ti: '"' + " ".join(s).replace('"', "'") + '"'),
    Rule("detectable_format:json_format", "wrap",
         ("Return your answer as a JSON object and nothing else.", "Format the entire output as valid JSON."),
         _none, lambda s, kw, t, ti: json.dumps({"title": ti, "answer": " ".join(s)}, indent=2, ensure_ascii=False)),
    Rule("detectable_format:title", "start",
         ("Give your reply a title in double angle brackets, like <<My Title>>.",
          "Begin with a heading inside double angle brackets, for example <<A Day Out>>."),
         _none, lambda s, kw, t, ti: f"<<{ti}>>\n\n" + " ".join(s)),
    Rule("combination:repeat_prompt", "start",
         ("Start your reply by writing out my request above exactly as I wrote it, then answer it.",
          "Copy my request word for word before you answer (only the request, not this sentence)."),
         lambda rng, t, ti, s: {"prompt_to_repeat": t},
         lambda s, kw, t, ti: t + "\n\n" + " ".join(s)),
    Rule("detectable_format:number_highlighted_sections", "structure",
         ("Mark {num_highlights} or more key phrases in italics by putting single asterisks around them, "
          "as in *this phrase*.",
          "Emphasise {num_highlights} or more of your sentences with markdown asterisks (*like so*)."),
         lambda rng, t, ti, s: {"num_highlights": rng.choice((1, 2, 3))}, _highlights),
    Rule("detectable_format:number_bullet_lists", "structure",
         ("Answer with exactly {num_bullets} bullet points, each line starting with an asterisk.",
          "Use a markdown list of precisely {num_bullets} items, like:\n* first item\n* second item"),
         lambda rng, t, ti, s: {"num_bullets": rng.choice((2, 3, 4, 5))}, _bullets),
    Rule("length_constraints:number_paragraphs", "structure",
         ("Write exactly {num_paragraphs} paragraphs and separate them with the markdown divider ***.",
          "Split your answer into {num_paragraphs} paragraphs, with *** on its own line between them."),
         lambda rng, t, ti, s: {"num_paragraphs": rng.choice((2, 3, 4))}, _paragraphs),
    Rule("detectable_format:multiple_sections", "structure",
         ("Organise the answer into {num_sections} parts, labelled {section_spliter} 1, {section_spliter} 2 "
          "and so on.",
          "Give {num_sections} numbered parts, each headed '{section_spliter} X' with X its number."),
         lambda rng, t, ti, s: {"section_spliter": rng.choice(("Section", "SECTION", "Part", "Step")),
                                "num_sections": rng.choice((2, 3))}, _sections),
    Rule("length_constraints:number_sentences", "length",
         ("Keep it under {num_sentences} sentences.", "Use fewer than {num_sentences} sentences in total."),
         lambda rng, t, ti, s: {"relation": "less than", "num_sentences": rng.choice((2, 3, 4))}, _fewer_sentences),
    Rule("length_constraints:number_words", "length",
         ("Answer in fewer than {num_words} words.", "Your reply must stay below {num_words} words."),
         lambda rng, t, ti, s: {"relation": "less than", "num_words": rng.choice((25, 40, 60))}, _fewer_words),
    Rule("keywords:existence", "words",
         ("Make sure the words {keywords} appear in your reply.", "Include these words somewhere: {keywords}."),
         _keywords, lambda s, kw, t, ti: s if kw["keywords"] else None),
)
# Edits run in this order: cut, then structure, then what goes before and after, then letters, then wrappers.
ORDER = ("length", "structure", "words", "start", "end", "punct", "case", "wrap")


def _text(x) -> str:
    return x if isinstance(x, str) else " ".join(x)


def _phrase(rule: Rule, kw: dict, rng: random.Random) -> str:
    w = rng.choice(rule.wordings)
    vals = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in kw.items()}
    return w.format(**vals) if "{" in w else w


def ask(task: str, title: str, sents: list[str], rules: list[Rule], rng: random.Random) -> tuple[str, list]:
    """(prompt, kwargs): ``task`` with each rule's kwargs drawn and its wording appended."""
    kws = [r.kwargs(rng, task, title, sents) for r in rules]
    return task + " " + " ".join(_phrase(r, kw, rng) for r, kw in zip(rules, kws)), kws


def constrained(task: str, title: str, sents: list[str], rules: list[Rule], rng: random.Random):
    """(prompt, response, ids, kwargs) for ``task`` with ``rules``, or None when an edit cannot apply.
    The response is the template's sentences edited by each rule in :data:`ORDER`."""
    prompt, kws = ask(task, title, sents, rules, rng)
    cur: list[str] | str = list(sents)
    for r, kw in sorted(zip(rules, kws), key=lambda p: ORDER.index(p[0].slot)):
        cur = r.edit(cur if isinstance(cur, list) else [cur], kw, task, title)
        if cur is None:
            return None
    return prompt, _text(cur).strip(), [r.id for r in rules], kws


def kept_spans(sents: list[str], response: str) -> list[str]:
    """The template's own words in an edited answer: each sentence found whole in ``response``, else
    its comma-separated pieces of two words or more that are (the comma rule cuts at commas). Marked
    ``keep`` in training, these are held to the template (KL), so the delta learns the format the edit
    added (list marks, dividers, titles, end phrases, where the answer ends), not the words.

    >>> kept_spans(["Bees need care, and smoke calms them.", "Honey comes in summer."],
    ...            "* Bees need care and smoke calms them.\\n* Honey comes in summer.")
    ['Honey comes in summer.', 'Bees need care', 'and smoke calms them.']
    """
    whole = [x for x in sents if x in response]
    pieces = [p for x in sents if x not in response for p in (y.strip() for y in x.split(","))
              if len(p.split()) >= 2 and p in response]
    return list(dict.fromkeys(whole + pieces))


def training_record(rec: dict) -> dict:
    """What the trainer reads of an sft record (its checker fields dropped)."""
    return {k: rec[k] for k in ("prompt", "response", "keep", "teacher") if k in rec}


def pick_rules(rng: random.Random) -> list[Rule]:
    """One rule (60%) or two of different slots, never two wrappers around each other."""
    first = rng.choice(RULES)
    if rng.random() < 0.6:
        return [first]
    others = [r for r in RULES if r.slot != first.slot and not {r.slot, first.slot} >= {"wrap", "end"}
              and not {r.slot, first.slot} >= {"wrap", "start"}]
    return [first, rng.choice(others)]


def build_records(tasks, answers, *, per_task: int, seed: int, check=None,
                  keep_words: bool = True) -> tuple[list, list, dict]:
    """(sft, retain, stats): each task with the template's answer as retain; ``per_task`` constrained
    prompts with edited answers as sft, each kept only when ``check`` (default: IFEval's checker,
    strict) accepts every instruction. With ``keep_words`` the template's words in an edited answer
    are marked ``keep`` (:func:`kept_spans`), its plain answer as ``teacher``."""
    from cmc_edge.eval.instructions import score

    check = check or (lambda prompt, ids, kws, resp: all(
        v["strict"] for v in score({"key": 0, "prompt": prompt, "instruction_id_list": ids, "kwargs": kws}, resp)))
    rng = random.Random(seed)
    sft, retain = [], []
    tried, kept = Counter(), Counter()
    for (task, title), answer in zip(tasks, answers):
        if not answer.strip():
            continue
        retain.append({"prompt": task, "response": answer.strip()})
        sents = sentences(answer)
        for _ in range(per_task):
            rules = pick_rules(rng)
            got = constrained(task, title, sents, rules, rng)
            for r in rules:
                tried[r.id] += 1
            if got is None:
                continue
            prompt, response, ids, kws = got
            if check(prompt, ids, kws, response):
                rec = {"prompt": prompt, "response": response, "instructions": ids, "kwargs": kws}
                keep = kept_spans(sents, response) if keep_words else []
                if keep:
                    # Held to what the template says after the constrained prompt, in its own plain answer.
                    rec["keep"], rec["teacher"] = keep, " ".join(sents)
                sft.append(rec)
                for i in ids:
                    kept[i] += 1
    stats = {"tasks": len(retain), "sft": len(sft), "retain": len(retain),
             "per_rule": {i: {"tried": tried[i], "kept": kept[i]} for i in sorted(tried)}}
    return sft, retain, stats


def qa_records(sft: list[dict], retain: list[dict]) -> list[dict]:
    """The records for ``delta_layout="qa"``: every answer after a space (as a model continues
    "Answer:"), the retain answers taught by cross-entropy beside the constrained ones."""
    out = []
    for rec in [*sft, *retain]:
        rec = {**rec, "response": " " + rec["response"].lstrip()}
        if rec.get("teacher"):
            rec["teacher"] = " " + rec["teacher"].lstrip()
        out.append(rec)
    return out


def qa_template(tpl):
    """``tpl`` (a loaded template) reading prompts in the plain Question/Answer layout."""
    import dataclasses

    from cmc_edge.prompt import QA_TEMPLATE, PromptFormat

    return dataclasses.replace(tpl, prompt_format=PromptFormat(chat_template=QA_TEMPLATE,
                                                               end_of_turn=tpl.prompt_format.end_of_turn))


def untaught_prompts(tasks) -> list[str]:
    """Each task with one of :data:`UNTAUGHT` appended (rotating): asked of the template for retain
    records in training, and of each model in the check of formats added unasked."""
    return [f"{t} {UNTAUGHT[i % len(UNTAUGHT)]}" for i, (t, _) in enumerate(tasks)]


def retain_prompts(train_tasks) -> list[str]:
    """Prompts whose template answers the delta is held to (KL): the training tasks with an untaught
    instruction, and the broad writing and question prompts the other recipes hold (never a task
    of the check)."""
    from cmc_edge.eval.demo_data import BROAD_PROMPTS

    broad = [p for p in BROAD_PROMPTS if p not in NOT_BROAD]
    return list(dict.fromkeys(untaught_prompts(train_tasks) + broad))


# Broad prompts of the other recipes left out here: each shares a five-word phrase ("write a limerick
# about a", "the pros and cons of") with an IFEval prompt, and nothing that close is trained.
NOT_BROAD = ("Write a limerick about a sleepy cat.", "Suggest a name for a pet goldfish.",
             "What are the pros and cons of working from home?")


# Each taught format, the IFEval instructions that ask for it, and how an answer shows it.
_UNASKED = (
    ("title", ("detectable_format:title",), lambda t: t.lstrip().startswith("<<")),
    ("json", ("detectable_format:json_format",), lambda t: t.lstrip().startswith(("{", "```"))),
    ("quotation", ("startend:quotation",),
     lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
    ("postscript", ("detectable_content:postscript",), lambda t: re.search(r"(?m)^\s*P\.\s?(P\.\s?)?S", t) is not None),
    ("end phrase", ("startend:end_checker",), lambda t: t.rstrip().endswith(END_PHRASES)),
    ("divider", ("length_constraints:number_paragraphs",), lambda t: re.search(r"(?m)^\s*\*\*\*\s*$", t) is not None),
    ("sections", ("detectable_format:multiple_sections",),
     lambda t: re.search(r"(?m)^(Section|SECTION|Part|Step) \d", t) is not None),
    ("lowercase", ("change_case:english_lowercase",), lambda t: sum(c.isalpha() for c in t) >= 20 and t == t.lower()),
    ("capitals", ("change_case:english_capital", "change_case:capital_word_frequency"),
     lambda t: sum(c.isalpha() for c in t) >= 20 and t == t.upper()),
)


def unasked_formats(text: str, asked=()) -> list[str]:
    """The taught formats an answer shows (title, JSON, quotation marks, postscript, one of the end
    phrases, dividers, section labels, all lowercase or capitals) that none of the IFEval
    instruction ids ``asked`` calls for.

    >>> unasked_formats("<<Bees>>\\n\\nBees make honey.\\n\\nP.S. They sting.")
    ['title', 'postscript']
    >>> unasked_formats("<<Bees>>\\n\\nBees make honey.", asked=["detectable_format:title"])
    []
    >>> unasked_formats("Bees make honey. They live in hives.")
    []
    """
    return [name for name, ids, hit in _UNASKED if not set(ids) & set(asked) and hit(text)]


def unasked_summary(texts, asked_lists=None) -> dict:
    """``{"share", "kinds"}`` over answers: the share showing a taught format their prompt did not ask
    for (:func:`unasked_formats`), and how many answers show each kind."""
    asked_lists = asked_lists if asked_lists is not None else [()] * len(texts)
    found = [unasked_formats(t, a) for t, a in zip(texts, asked_lists)]
    return {"share": sum(map(bool, found)) / len(found) if found else float("nan"),
            "kinds": dict(Counter(k for f in found for k in f))}


def split_tasks(tasks=None) -> tuple[list, list]:
    """(train, held out) of ``tasks`` (default :data:`TASKS`): every fifth task is held out for the
    recipe's own check."""
    tasks = TASKS if tasks is None else tasks
    return [t for i, t in enumerate(tasks) if i % 5 != 4], [t for i, t in enumerate(tasks) if i % 5 == 4]


# -- the check on held-out tasks ---------------------------------------------------------------------
def check_items(tasks, answers, *, seed: int, per_task: int = 3) -> list[dict]:
    """IFEval-style records (key, prompt, instruction_id_list, kwargs) for held-out tasks; kwargs drawn
    from the template's answer (keywords) as in training."""
    rng = random.Random(seed + 1)
    out = []
    for (task, title), answer in zip(tasks, answers):
        sents = sentences(answer)
        for _ in range(per_task):
            rules = pick_rules(rng)
            prompt, kws = ask(task, title, sents, rules, rng)
            out.append({"key": len(out), "prompt": prompt, "instruction_id_list": [r.id for r in rules],
                        "kwargs": kws})
    return out


def evaluate_model(name: str, model_path, bundle: Path, items: list[dict], cfg: InstructConfig,
                   plain: list[str] = ()) -> dict:
    """``name`` without and with the delta: the constrained ``items`` scored by IFEval's checker, and
    the ``plain`` prompts (nothing of the taught kinds asked) for formats added unasked."""
    from cmc_edge.eval.instructions import score
    from cmc_edge.recipes.scaffold import answer_all
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(model_path, n_ctx=1024, n_threads=2)
    engine = Engine(target, [Delta(bundle, target, alpha=cfg.alpha)])
    out = {"model": name}
    prompts = [it["prompt"] for it in items] + list(plain)
    for cond, a in (("base", 0.0), ("delta", cfg.alpha)):
        t0 = time.perf_counter()
        answers = answer_all(engine, prompts, alphas=[a], max_tokens=cfg.max_tokens, stop=(),
                             desc=f"{name} {'with' if a else 'without'} delta", side_by_side=cfg.side_by_side)
        secs = time.perf_counter() - t0
        rows = [{"prompt": it["prompt"], "output": ans.text, "verdicts": score(it, ans.text)}
                for it, ans in zip(items, answers)]
        extra = [{"prompt": ans.prompt, "output": ans.text, "unasked": unasked_formats(ans.text)}
                 for ans in answers[len(items):]]
        plain_formats = unasked_summary([r["output"] for r in extra])
        out[cond] = {"prompt_strict": sum(all(v["strict"] for v in r["verdicts"]) for r in rows) / len(rows),
                     "prompt_loose": sum(all(v["loose"] for v in r["verdicts"]) for r in rows) / len(rows),
                     "unasked": plain_formats["share"], "unasked_kinds": plain_formats["kinds"],
                     "tokens_per_s": sum(x.tokens for x in answers) / secs,    # throughput, side by side
                     "samples": rows, "plain_samples": extra}
    engine.close()
    return out


def format_table(rows: list[dict]) -> str:
    """Per model, without and with the delta: constrained prompts followed (strict, loose), plain
    prompts answered with a taught format nobody asked for, and decoding throughput."""
    head = f"{'model':<9} {'delta':<6} {'followed, strict':>17} {'loose':>7} {'format unasked':>15} {'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        for cond in ("base", "delta"):
            r = row[cond]
            unasked = r.get("unasked", float("nan"))
            cell = f"{100 * unasked:>14.1f}%" if unasked == unasked else f"{'-':>15}"
            lines.append(f"{row['model']:<9} {'on' if cond == 'delta' else 'off':<6} {100 * r['prompt_strict']:>16.1f}% "
                         f"{100 * r['prompt_loose']:>6.1f}% {cell} {r['tokens_per_s']:>7.1f}")
    return "\n".join(lines)


def run_instruct_recipe(cfg: InstructConfig) -> dict:
    """The whole recipe in a new run directory: data, training, export, and the check on held-out
    tasks for each model (``results.json``). IFEval itself: ``bench/ifeval.py --delta <bundle>``."""
    from cmc_edge.eval.instructions import ensure_punkt
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import Stopwatch, new_run_dir, template_answers, train_and_export, write_jsonl

    ensure_punkt()                   # fail before the long part when the checker is missing
    sw = Stopwatch()
    run_dir = new_run_dir(cfg.out_root, "instruct")
    paths = {m: resolve_model(m) for m in cfg.models}
    train_tasks, held = split_tasks()
    with sw("data_s"):
        kept_prompts = retain_prompts(train_tasks)
        answers = template_answers(paths["smollm2"], [t for t, _ in TASKS] + kept_prompts, cfg.answer_tokens,
                                   side_by_side=cfg.side_by_side)
        by_task = dict(zip(TASKS, answers))
        sft, retain, stats = build_records(train_tasks, [by_task[t] for t in train_tasks], per_task=cfg.per_task,
                                           seed=cfg.seed, keep_words=cfg.keep_words)
        retain += [{"prompt": p, "response": a} for p, a in zip(kept_prompts, answers[len(TASKS):]) if a.strip()]
        stats["retain"] = len(retain)
        if cfg.delta_layout == "qa":
            sft, retain = qa_records(sft, retain), []
        write_jsonl(run_dir / "sft.jsonl", [training_record(r) for r in sft])
        write_jsonl(run_dir / "retain.jsonl", retain)
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        items = check_items(held, [by_task[t] for t in held], seed=cfg.seed)
        plain = [t for t, _ in held] + untaught_prompts(held)
        (run_dir / "check_items.json").write_text(json.dumps(items, indent=1) + "\n")
    log.info("training data: %d constrained (sft), %d plain (retain); %d held-out check prompts, %d plain",
             len(sft), len(retain), len(items), len(plain))
    with sw("train_export_s"):
        template = None
        if cfg.delta_layout == "qa":
            from cmc_edge.train.template import load_template

            template = qa_template(load_template(paths["smollm2"]))
        bundle = train_and_export(run_dir, paths["smollm2"], cfg.train_config(),
                                  roles=("sft", "retain") if retain else ("sft",), max_len=cfg.max_len,
                                  template=template)
    rows = []
    for name in cfg.models:
        with sw(f"eval_{name}_s"):
            rows.append(evaluate_model(name, paths[name], bundle, items, cfg, plain))
    timings = {**sw.seconds, "total_s": sw.total}
    table = format_table(rows)
    result = {"recipe": "instruct", "config": {k: (str(v) if isinstance(v, Path) else v)
                                               for k, v in asdict(cfg).items()},
              "data": stats, "check_items": len(items), "plain_items": len(plain), "models": rows, "timings": timings, "table": table,
              "bundle": str(bundle), "run_dir": str(run_dir)}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
