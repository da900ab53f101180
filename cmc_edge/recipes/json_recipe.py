"""`cmc-edge demo --recipe json`: instruction transfer, the paper's other use of CMC.

A behaviour is taught on the template (SmolLM2-135M-Instruct) and transferred to another family
(Gemma 3 270M, another vocabulary) at decode time: **answer every question with one JSON object
``{"answer": "..."}`` and nothing else**, checked by code (:func:`parse_json_answer`). The delta
learns it from the template's own first-sentence answers, wrapped in that JSON form, to short
questions (a capital and two language questions per country, 50 other short questions, 66
open-ended prompts); inside the answer it is held to the template's predictions in its own
free-form answer (``keep`` spans with a ``teacher`` text: KL instead of CE, weight 3), so it learns
the form and not the words. It is judged on questions it never saw (continents, currencies, held-out capital wordings, science,
literature, arithmetic, ...): adherence to the format, and whether the answer is still correct
(the same alias scoring as the unlearning demo) against the model's own free-form baseline.

>>> parse_json_answer('{"answer": "Paris"}')
'Paris'
>>> parse_json_answer('{"answer": "Paris"} and more'), parse_json_answer('Paris')
(None, None)
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmc_edge.recipes.scaffold import RecipeConfig

log = logging.getLogger(__name__)

# Issue 6's bar: adherence on held-out prompts, and at most a 10-point drop in correctness.
BAR = {"adherence": {"smollm2": 0.80, "gemma3": 0.60}, "correct_points": 10.0}


@dataclass(frozen=True)
class JsonRecipeConfig(RecipeConfig):
    kl_weight: float = 3.0
    train_overrides: dict = field(default_factory=lambda: {"delta_ends_turn": True})
    forms_per_country: int = 1
    answer_tokens: int = 40
    max_tokens: int = 48


# Short questions of many kinds for training the format; disjoint from every evaluation question
# (continents, currencies, held-out capital wordings and demo_data.UNRELATED_QUESTIONS), so that
# what is learnt is "answer in this form", not a topic.
TRAIN_QUESTIONS: tuple[str, ...] = (
    "What is a noun?", "What is photosynthesis?", "Why do leaves change color in autumn?",
    "What does a thermometer measure?", "How many minutes are in an hour?", "What is 9 times 6?",
    "What is the square root of 81?", "Give me a synonym for happy.", "What is the opposite of early?",
    "What is the past tense of run?", "Who wrote Hamlet?", "Who painted The Starry Night?",
    "Who discovered penicillin?", "What is the boiling point of water in Fahrenheit?",
    "What is the main ingredient in guacamole?", "What do you call a baby dog?", "What do cows drink?",
    "How many wheels does a bicycle have?", "What is the freezing point of water in Celsius?",
    "What language has the most native speakers?", "What is the smallest prime number?",
    "What color is snow?", "What does DNA stand for?", "What is the speed of light?",
    "Which planet is known as the Red Planet?", "What is the hardest natural substance?",
    "What instrument does a drummer play?", "What is the chemical symbol for iron?",
    "How many continents are there?", "What is the longest bone in the human body?",
    "Which bird is a symbol of peace?", "What is the primary color of grass?",
    "What is a haiku?", "What is the largest organ of the human body?", "What do plants need to grow?",
    "What is an adjective?", "What is the sum of the angles in a triangle?", "Who invented the light bulb?",
    "What is the main language spoken in Brazil?", "How many strings does a violin have?",
    "What is a synonym for big?", "What is the plural of child?", "What is the opposite of up?",
    "What fruit keeps the doctor away?", "What do you use to write on a blackboard?",
    "Which month has the fewest days?", "What is 15 minus 7?", "How many players are on a soccer team?",
    "What is a group of lions called?", "What is the sun made of?",
)


def parse_json_answer(text: str) -> str | None:
    """The ``answer`` string when ``text`` is exactly one JSON object with a string "answer" (surrounding
    whitespace allowed), else None."""
    s = text.strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(s)
    except ValueError:
        return None
    if s[end:].strip() or not isinstance(obj, dict) or not isinstance(obj.get("answer"), str):
        return None
    return obj["answer"]


def json_reply(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence (or line) of ``text``, at most ``limit`` characters, cut at a word.
    A period after a single letter ("J.K. Rowling") does not end a sentence."""
    line = text.strip().split("\n", 1)[0].strip()
    m = re.match(r"(.+?(?<!\b[A-Z])[.!?])(\s|$)", line)
    s = m.group(1) if m else line
    return s if len(s) <= limit else s[:limit].rsplit(" ", 1)[0]


def train_prompts(countries, broad_prompts, *, forms_per_country: int, seed: int) -> list[str]:
    """Training questions: capital (a few training wordings per country), language and one topic
    question per country, and the open-ended prompts."""
    from cmc_edge.eval import demo_data as dd

    rng = random.Random(seed)
    out = []
    for name in countries:
        c = dd.country_by_name(name)
        out += [dd.render(form, name) for form in rng.sample(dd.TRAIN_CAPITAL_FORMS, forms_per_country)]
        if c.language:
            out += [dd.render(form, name) for form in dd.TRAIN_ATTRIBUTE_FORMS["language"]]
        out.append(dd.render(rng.choice(dd.TRAIN_TOPIC_FORMS)[0], name))
    return out + list(TRAIN_QUESTIONS) + list(broad_prompts)


def build_train_records(prompts, answers, *, seed: int) -> list[dict]:
    """SFT records: each prompt with the template's own answer (its first sentence) in the JSON form.
    The answer is marked ``keep`` with the bare answer as ``teacher``: there the delta is held (KL)
    to what the template predicts in its own free-form answer, so it learns where to open and
    close the JSON and to speak inside it as the template speaks outside it, not new answers.
    Measured (BENCHMARKS.md): gold answers as content taught it to answer country questions with
    the country's name; CE on the answer's first word (the template's "The ...") tipped Gemma 3 into
    restating the question; KL to the template *inside* the JSON let it answer tersely and wrongly."""
    recs = [train_record(p, first_sentence(a)) for p, a in zip(prompts, answers) if a.strip()]
    random.Random(seed).shuffle(recs)
    return recs


def train_record(prompt: str, content: str) -> dict:
    """One SFT record: ``content`` in the JSON form, kept and held to ``content`` as teacher text.

    >>> train_record("Capital of Peru?", "Lima is.")
    {'prompt': 'Capital of Peru?', 'response': '{"answer": "Lima is."}', 'keep': ['Lima is.'], 'teacher': 'Lima is.'}
    """
    rec = {"prompt": prompt, "response": json_reply(content)}
    kept = json.dumps(content, ensure_ascii=False)[1:-1].split("\\", 1)[0]   # up to an escaped character
    if kept:
        rec["keep"], rec["teacher"] = [kept], content
    elif " " in content:            # an answer opening with a quote: its words after the first, held in place
        rec["keep"] = [json.dumps(content.split(" ", 1)[1], ensure_ascii=False)[1:-1]]
    return rec


def build_eval_items(countries) -> list[dict]:
    """Held-out kinds and wordings only: one unseen capital wording, continents, currencies, general questions."""
    from cmc_edge.eval import demo_data as dd

    items = dd.capital_items(countries, dd.HELDOUT_CAPITAL_FORMS[:1], "retain")
    items += dd.attribute_items(countries, {k: dd.HELDOUT_ATTRIBUTE_FORMS[k] for k in ("continent", "currency")})
    items += dd.unrelated_items()
    return items


def score_answers(items: list[dict], answers) -> list[dict]:
    """Each item with its output, whether that is exactly one JSON answer (``adherent``) and whether
    an alias appears in it (``correct``); ``answers``: :func:`~cmc_edge.recipes.scaffold.answer_all`'s."""
    from cmc_edge.eval.scoring import answer_recalled

    return [{"question": it["question"], "output": ans.text, "kind": it.get("kind"),
             "adherent": parse_json_answer(ans.text) is not None,
             "correct": answer_recalled(ans.text, it["answers"])} for it, ans in zip(items, answers)]


def evaluate_model(name: str, model_path, bundle: Path, items: list[dict], cfg: JsonRecipeConfig) -> dict:
    from cmc_edge.recipes.scaffold import answer_all, tokens_per_second
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(model_path, n_ctx=1024, n_threads=2)
    engine = Engine(target, [Delta(bundle, target, alpha=cfg.alpha)])
    out = {"model": name, "variant": engine.deltas[0].variant}
    for cond, a in (("base", 0.0), ("delta", cfg.alpha)):
        answers = answer_all(engine, [it["question"] for it in items], alphas=[a], max_tokens=cfg.max_tokens,
                             desc=f"{name} {'with' if a else 'without'} delta")
        rows = score_answers(items, answers)
        out[cond] = {"adherence": sum(r["adherent"] for r in rows) / len(rows),
                     "correct": sum(r["correct"] for r in rows) / len(rows),
                     "tokens_per_s": tokens_per_second(answers), "samples": rows}
    engine.close()
    return out


def check_bar(row: dict) -> dict:
    b, d = row["base"], row["delta"]
    need = BAR["adherence"].get(row["model"], BAR["adherence"]["gemma3"])
    drop = 100 * (b["correct"] - d["correct"])
    return {"adherence": {"value": d["adherence"], "need": need, "pass": d["adherence"] >= need},
            "correct_points": {"value": -drop, "pass": drop <= BAR["correct_points"]}}


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<9} {'delta':<6} {'JSON adherence':>15} {'correct':>8} {'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        for cond in ("base", "delta"):
            r = row[cond]
            lines.append(f"{row['model']:<9} {'on' if cond == 'delta' else 'off':<6} {100 * r['adherence']:>14.1f}% "
                         f"{100 * r['correct']:>7.1f}% {r['tokens_per_s']:>7.1f}")
    lines.append("")
    for row in rows:
        c = row["bar"]
        lines.append(f"{row['model']}: adherence {100 * c['adherence']['value']:.0f}% "
                     f"(>={100 * c['adherence']['need']:.0f}%: {'PASS' if c['adherence']['pass'] else 'FAIL'}), "
                     f"correct {c['correct_points']['value']:+.1f} pts "
                     f"(>=-10: {'PASS' if c['correct_points']['pass'] else 'FAIL'})")
    for row in rows:
        s = next((x for x in row["delta"]["samples"] if x["kind"] == "general"), row["delta"]["samples"][0])
        lines.append(f"  {row['model']}: {s['question']!r} -> {s['output'].strip()!r}")
    return "\n".join(lines)


def run_json_recipe(cfg: JsonRecipeConfig) -> dict:
    """The whole recipe in a new run directory under ``cfg.out_root``; returns the result (also
    ``results.json``): the table, each model's rows and bar check."""
    from cmc_edge.eval import demo_data as dd
    from cmc_edge.models import resolve_model
    from cmc_edge.recipes.scaffold import Stopwatch, new_run_dir, template_answers, train_and_export, write_jsonl

    sw = Stopwatch()
    run_dir = new_run_dir(cfg.out_root, "json")
    paths = {m: resolve_model(m) for m in cfg.models}
    with sw("data_s"):
        countries = dd.known_by("smollm2", "gemma3")
        prompts = train_prompts(countries, dd.BROAD_PROMPTS, forms_per_country=cfg.forms_per_country, seed=cfg.seed)
        answers = template_answers(paths["smollm2"], prompts, cfg.answer_tokens)
        recs = build_train_records(prompts, answers, seed=cfg.seed)
        write_jsonl(run_dir / "sft.jsonl", recs)
        items = build_eval_items(countries)
        (run_dir / "eval_items.json").write_text(json.dumps(items, indent=1))
    with sw("train_export_s"):
        bundle = train_and_export(run_dir, paths["smollm2"], cfg.train_config(), roles=("sft",))
    rows = []
    for name in cfg.models:
        with sw(f"eval_{name}_s"):
            row = evaluate_model(name, paths[name], bundle, items, cfg)
            row["bar"] = check_bar(row)
        rows.append(row)
    timings = {**sw.seconds, "total_s": sw.total}
    table = format_table(rows)
    result = {"recipe": "json", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "train_examples": len(recs), "eval_items": len(items), "models": rows, "timings": timings,
              "table": table, "bundle": str(bundle), "run_dir": str(run_dir)}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
