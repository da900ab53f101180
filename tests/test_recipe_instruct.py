"""The instruction recipe's data: the template's answers edited by rule, kept only when IFEval's
checker accepts them, never IFEval's prompts; and the recipe end to end on the tiny GGUF."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from cmc_edge.eval.instructions import score
from cmc_edge.recipes import instruct as ins

ANSWER = ("Bees need care, and they need it often. A beekeeper checks the hives every week. In summer, honey is "
          "harvested from the frames. The work is calm but careful! Smoke keeps the bees quiet. Good keepers "
          "write notes after each visit.")
IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl"


def _verdicts(prompt, ids, kws, response):
    return score({"key": 0, "prompt": prompt, "instruction_id_list": ids, "kwargs": kws}, response)


@pytest.mark.parametrize("rule", ins.RULES, ids=lambda r: r.id)
def test_each_rules_edit_follows_ifevals_checker_and_the_plain_answer_does_not(rule):
    sents = ins.sentences(ANSWER)
    for seed in range(4):
        prompt, response, ids, kws = ins.constrained("Describe a beekeeper's week.", "The Bees", sents, [rule],
                                                     random.Random(seed))
        assert ids == [rule.id] and prompt.startswith("Describe a beekeeper's week. ")
        assert all(v["strict"] for v in _verdicts(prompt, ids, kws, response)), (rule.id, kws, response)
        if rule.id != "keywords:existence":          # the one rule whose kwargs come from the answer itself
            assert not all(v["strict"] for v in _verdicts(prompt, ids, kws, ANSWER)), (rule.id, kws)


def test_records_keep_only_answers_the_checker_accepts():
    tasks = list(ins.TASKS[:6])
    sft, retain, stats = ins.build_records(tasks, [ANSWER] * 6, per_task=5, seed=0)
    assert [r["prompt"] for r in retain] == [t for t, _ in tasks] and all(r["response"] == ANSWER for r in retain)
    assert len(sft) == stats["sft"] > 0
    for r in sft:
        assert all(v["strict"] for v in _verdicts(r["prompt"], r["instructions"], r["kwargs"], r["response"]))
    assert sum(s["tried"] for s in stats["per_rule"].values()) >= 6 * 5
    refused, retain2, _ = ins.build_records(tasks, [ANSWER] * 6, per_task=5, seed=0, check=lambda *a: False)
    assert refused == [] and retain2 == retain
    # an answer too short for a count (two or more bullets from one sentence) is dropped, not padded
    short, _, st = ins.build_records(tasks, ["Only one sentence here."] * 6, per_task=20, seed=1)
    assert st["per_rule"]["detectable_format:number_bullet_lists"]["tried"] > 0
    assert st["per_rule"]["detectable_format:number_bullet_lists"]["kept"] == 0
    assert not any("detectable_format:number_bullet_lists" in r["instructions"] for r in short)


def test_template_words_are_kept_and_only_the_format_is_taught(tmp_path):
    """Each edited answer marks the template's own words ``keep`` (held by KL, with the plain answer
    as teacher), so cross-entropy falls on what the edit added; the trainer's reader accepts them."""
    from cmc_edge.recipes.scaffold import write_jsonl
    from cmc_edge.train.data import read_jsonl

    sents = ins.sentences(ANSWER)
    sft, _, _ = ins.build_records(list(ins.TASKS[:8]), [ANSWER] * 8, per_task=6, seed=0)
    by_rule = {r["instructions"][0]: r for r in sft if len(r["instructions"]) == 1}
    bullets = by_rule["detectable_format:number_bullet_lists"]
    n = bullets["kwargs"][0]["num_bullets"]
    assert bullets["keep"] == sents[:n] and bullets["teacher"] == " ".join(sents)
    taught = bullets["response"]
    for k in bullets["keep"]:
        taught = taught.replace(k, "")
    assert taught.split() == ["*"] * n                         # only the list marks are learnt
    commas = by_rule["punctuation:no_comma"]
    assert "Bees need care" in commas["keep"] and "and they need it often." in commas["keep"]
    assert "keep" not in by_rule["change_case:english_capital"]    # no template word survives upper-casing
    for r in sft:
        assert all(k in r["response"] and k in r.get("teacher", "") for k in r.get("keep", ()))
    write_jsonl(tmp_path / "sft.jsonl", [ins.training_record(r) for r in sft])
    assert len(read_jsonl(tmp_path / "sft.jsonl")) == len(sft)
    plain, _, _ = ins.build_records(list(ins.TASKS[:8]), [ANSWER] * 8, per_task=6, seed=0, keep_words=False)
    assert [r["response"] for r in plain] == [r["response"] for r in sft] and not any("keep" in r for r in plain)


def test_held_out_tasks_are_never_trained():
    train, held = ins.split_tasks()
    assert len(held) >= 10 and not set(train) & set(held) and len(train) + len(held) == len(ins.TASKS)
    sft, retain, _ = ins.build_records(train, [ANSWER] * len(train), per_task=4, seed=0)
    items = ins.check_items(held, [ANSWER] * len(held), seed=0)
    held_texts = [t for t, _ in held]
    assert not any(r["prompt"].startswith(t) for r in sft + retain for t in held_texts)
    assert items and all(any(it["prompt"].startswith(t + " ") for t in held_texts) for it in items)
    assert all(it["instruction_id_list"] and len(it["kwargs"]) == len(it["instruction_id_list"]) for it in items)


@pytest.mark.skipif(not IFEVAL.is_file(), reason="needs ../shared/data/ifeval beside the repository")
def test_no_training_text_shares_five_words_with_an_ifeval_prompt():
    def grams(text, n=5):
        w = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    ifeval = set().union(*(grams(json.loads(line)["prompt"]) for line in IFEVAL.read_text().splitlines() if line))
    train, _ = ins.split_tasks()
    ours = ([t for t, _ in ins.TASKS] + [w for r in ins.RULES for w in r.wordings] + list(ins.UNTAUGHT)
            + list(ins.END_PHRASES) + ins.retain_prompts(train))
    assert [t for t in ours if grams(t) & ifeval] == []
    # the check itself bites: an IFEval sentence is found
    first = json.loads(IFEVAL.read_text().splitlines()[0])["prompt"]
    assert grams(first) & ifeval


def test_a_postscript_is_the_templates_own_last_sentence_and_only_its_marker_is_taught():
    """No fixed postscript text to learn (six of them fired unasked on IFEval): the body is the
    template's last sentence, kept (KL), so cross-entropy falls on the marker alone."""
    rule = next(r for r in ins.RULES if r.id == "detectable_content:postscript")
    sents = ins.sentences(ANSWER)
    sft, _, _ = ins.build_records(list(ins.TASKS[:12]), [ANSWER] * 12, per_task=8, seed=3)
    recs = [r for r in sft if r["instructions"] == [rule.id]]
    assert recs
    for r in recs:
        marker = r["kwargs"][0]["postscript_marker"]
        assert r["response"].endswith(f"\n\n{marker} {sents[-1]}") and sents[-1] in r["keep"]
        taught = r["response"]
        for k in r["keep"]:
            taught = taught.replace(k, "")
        assert taught.split() == [marker]
    assert rule.edit(["Only one sentence."], {"postscript_marker": "P.S."}, "t", "T") is None


@pytest.mark.parametrize("text, kinds", [
    ("<<Bees>>\n\nBees make honey.", ["title"]),
    ('{\n  "answer": "Bees make honey."\n}', ["json"]),
    ('"Bees make honey."', ["quotation"]),
    ("Bees make honey.\n\nP.P.S They sting.", ["postscript"]),
    ("Bees make honey. Stay curious.", ["end phrase"]),
    ("Bees make honey.\n\n***\n\nThey sting.", ["divider"]),
    ("Section 1\nBees make honey.", ["sections"]),
    ("bees make honey and live in hives together.", ["lowercase"]),
    ("BEES MAKE HONEY AND LIVE IN HIVES TOGETHER.", ["capitals"]),
    ("Bees make honey. They live in hives, and a keeper says: \"calm\".", []),
    ("A p.s. in the middle is fine. Part of the hive is warm.", []),
])
def test_unasked_formats_names_each_taught_format_and_nothing_in_plain_prose(text, kinds):
    assert ins.unasked_formats(text) == kinds


def test_retain_prompts_hold_untaught_instructions_and_broad_prompts_never_a_held_out_task():
    from cmc_edge.eval.demo_data import BROAD_PROMPTS

    train, held = ins.split_tasks()
    got = ins.retain_prompts(train)
    assert got[:len(train)] == [f"{t} {ins.UNTAUGHT[i % len(ins.UNTAUGHT)]}" for i, (t, _) in enumerate(train)]
    assert set(BROAD_PROMPTS) - set(ins.NOT_BROAD) <= set(got) and len(set(got)) == len(got)
    assert not set(ins.NOT_BROAD) & set(got) and set(ins.NOT_BROAD) <= set(BROAD_PROMPTS)
    assert not any(p.startswith(t) for p in got for t, _ in held)
    # no untaught instruction asks for a taught format
    assert not any(ins.unasked_formats(u) for u in ins.UNTAUGHT)


def test_qa_layout_records_teach_the_answers_after_the_plain_layouts_answer_cue(tmp_path, tiny_gguf):
    """``delta_layout="qa"``: every answer (constrained and plain) is cross-entropy data, written
    after a space as a model continues "Answer:", kept words and teachers still inside it, and the
    template reads the prompts in the Question/Answer layout."""
    from cmc_edge.errors import InputError
    from cmc_edge.prompt import render_prompt
    from cmc_edge.recipes.scaffold import write_jsonl
    from cmc_edge.train.data import encode_records, read_jsonl
    from cmc_edge.train.template import load_template

    sft, retain, _ = ins.build_records(list(ins.TASKS[:4]), [ANSWER] * 4, per_task=3, seed=0)
    qa = ins.qa_records([ins.training_record(r) for r in sft], retain)
    assert len(qa) == len(sft) + len(retain)
    assert all(r["response"].startswith(" ") and not r["response"].startswith("  ") for r in qa)
    assert all(k in r["response"] and k in r["teacher"] for r in qa for k in r.get("keep", ()))
    assert [r["response"][1:] for r in qa[len(sft):]] == [r["response"] for r in retain]
    tpl = ins.qa_template(load_template(tiny_gguf))
    assert render_prompt(tpl.prompt_format, [{"role": "user", "content": "Hi?"}]) == "Question: Hi?\nAnswer:"
    write_jsonl(tmp_path / "sft.jsonl", qa)
    ex = encode_records(read_jsonl(tmp_path / "sft.jsonl"), tpl.tokenizer, tpl.prompt_format, "sft", 512)
    assert len(ex) == len(qa)
    with pytest.raises(InputError, match="delta_layout"):
        ins.InstructConfig(delta_layout="turn")
