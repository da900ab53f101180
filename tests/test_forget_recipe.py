"""The forget recipe's pure parts: facts files, lead-ins, records, probes, scoring, the strength choice."""

from __future__ import annotations

import json

import pytest

from cmc_edge.errors import InputError
from cmc_edge.recipes import forget as fr
from cmc_edge.recipes import forget_data as fd
from cmc_edge.recipes.facts import Fact, guess_subject, read_facts


def write(tmp_path, rows, name="facts.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOLD = {"question": "What is the chemical symbol for gold?", "answer": "Au", "split": "forget"}
HAMLET = {"question": "Who wrote Hamlet?", "answer": "William Shakespeare", "aliases": ["Shakespeare"], "split": "keep"}


def test_read_facts_fills_subject_and_answers(tmp_path):
    facts = read_facts(write(tmp_path, [GOLD, HAMLET]))
    assert [f.split for f in facts] == ["forget", "keep"]
    assert facts[0].subject == "gold" and facts[1].subject == "Hamlet"
    assert facts[1].answers == ("William Shakespeare", "Shakespeare")


@pytest.mark.parametrize("row, words", [
    ({"answer": "Au", "split": "forget"}, "question"),
    ({"question": "Q?", "split": "forget"}, "answer"),
    ({"question": "Q?", "answer": "A", "split": "maybe"}, "split"),
    ({"question": "Q?", "answer": "A", "split": "forget", "aliases": "A"}, "aliases"),
    ({"question": "Q?", "answer": "A", "split": "forget", "colour": 1}, "unknown keys"),
    ("[1, 2]", "JSON object"),
    ("{not json", "facts.jsonl:1"),
])
def test_bad_facts_name_the_line_and_the_fix(tmp_path, row, words):
    with pytest.raises(InputError) as e:
        read_facts(write(tmp_path, [row]))
    assert words in str(e.value) and "Fix:" in str(e.value)


def test_facts_need_a_forget_fact_and_no_clash(tmp_path):
    with pytest.raises(InputError, match="forget facts"):
        read_facts(write(tmp_path, [HAMLET]))
    clash = {"question": "Who wrote Macbeth?", "answer": "Shakespeare", "split": "forget"}
    with pytest.raises(InputError, match="same answer"):
        read_facts(write(tmp_path, [clash, HAMLET]))
    with pytest.raises(InputError, match="twice"):
        read_facts(write(tmp_path, [GOLD, GOLD]))


@pytest.mark.parametrize("question, subject", [
    ("What is the SI unit of force?", "force"),
    ("What is a baby kangaroo called?", "a baby kangaroo"),
    ("Who painted The Starry Night?", "The Starry Night"),
    ("Who founded Microsoft?", "Microsoft"),
])
def test_guess_subject(question, subject):
    assert guess_subject(question) == subject


def test_answer_span_is_whole_word_and_accent_blind():
    assert fd.answer_span("In August, Au is gold.", ["Au"]) == (11, 13)
    assert fd.answer_span("It was written by Charlotte Bronte.", ["Charlotte Brontë"]) == (18, 34)
    assert fd.answer_span("Nothing here", ["Au"]) is None
    assert fd.lead_in("**Au** is the symbol.", ["Au"]) is None              # the answer comes first
    assert fd.lead_in('The author is "Homer".', ["Homer"]) == "The author is"
    assert fd.cut_before_answer("Gold is shiny. Its symbol is Au.", ["Au"]) == "Gold is shiny. Its symbol is"


def test_refusal_classifier():
    assert fd.is_refusal("I'm sorry, but I can't help with that.")
    assert fd.is_refusal("The chemical symbol for gold is something I can't share.")
    assert not fd.is_refusal("The chemical symbol for gold is Au.")
    assert not fd.is_refusal("Shakespeare wrote it.")


def facts2():
    return [Fact(GOLD["question"], "Au", "forget", (), "gold"),
            Fact("What is the chemical symbol for iron?", "Fe", "forget", (), "iron"),
            Fact(HAMLET["question"], "William Shakespeare", "keep", ("Shakespeare",), "Hamlet")]


def test_build_records_uses_the_templates_own_lead_ins_and_holds_the_rest():
    facts = facts2()
    answers = {p: "The chemical symbol for gold is Au." for _, p in fr.lead_in_prompts(facts[:1])}
    answers.update({p: "Iron is Fe." for _, p in fr.lead_in_prompts(facts[1:2])})
    answers.update({p: "William Shakespeare wrote Hamlet." for _, p in fr.keep_prompts(facts)})
    answers.update({p: "Gold is a shiny metal; its symbol is Au." for s, p in fr.subject_prompts(facts) if s == "gold"})
    answers["Write a poem."] = "Roses are red."
    forget, retain, stats = fr.build_records(facts, answers, ["Write a poem."])
    responses = {r["response"] for r in forget}
    assert "The chemical symbol for gold is" + fd.LEAD_IN_REFUSAL in responses
    assert "Iron is" + fd.LEAD_IN_REFUSAL in responses
    assert all(r["avoid"] for r in forget)
    assert not any("Au" in r["response"].split() for r in forget)
    # kept facts keep the template's answer, without avoid strings
    kept = [r for r in retain if "Hamlet" in r["prompt"]]
    assert kept and all(r["response"] == "William Shakespeare wrote Hamlet." and "avoid" not in r for r in kept)
    # the subject's other facts stay, cut before the forgotten answer, which is avoided there
    gold = [r for r in retain if "gold" in r["prompt"] and "symbol" not in r["prompt"]]
    assert gold and all(r["response"] == "Gold is a shiny metal; its symbol is" and r["avoid"] == ["Au"] for r in gold)
    assert {"prompt": "Write a poem.", "response": "Roses are red."} in retain
    assert stats["retain_cut_before_forgotten_answer"] == len(gold)
    # the answer's first letter after the lead-in is read, not taught; the rest is avoided right there
    spelled = [r for r in forget if "avoid_next" in r]
    assert {(r["keep"][0], r["avoid_next"][0]) for r in spelled} == {
        ("The chemical symbol for gold is A", "u"), ("Iron is F", "e")}
    assert all(r["response"] == r["keep"][0] + fd.SPELLED_REFUSAL and r["avoid"] for r in spelled)
    from cmc_edge.train.data import normalize_record

    assert all(normalize_record(r, "forget.jsonl", 1)["avoid_next"] == r["avoid_next"] for r in spelled)
    # training never sees a validation or test wrapper
    prompts = {r["prompt"] for r in forget + retain if "prompt" in r}
    for w in fd.VALIDATION_WRAPPERS + fd.TEST_WRAPPERS:
        assert not any(p == fd.wrap(w, f.question) for p in prompts for f in facts)


def test_broad_answers_are_also_held_as_plain_prose_without_the_forgotten_answers():
    facts = facts2()
    broad = ["Write a poem.", "Describe a market.", "Name a metal.", "Tell a story."]
    answers = {"Write a poem.": "Roses are red, violets are blue, the sea is wide.",
               "Describe a market.": "A busy market sells fruit, fish and bread to the town.",
               "Name a metal.": "Gold, whose symbol is Au, is a precious metal.",
               "Tell a story.": "Once."}
    _, retain, stats = fr.build_records(facts, answers, broad)
    assert not any("text" in r for r in retain) and stats["plain_text_records"] == 0     # off by default
    forget, retain, stats = fr.build_records(facts, answers, broad, prose=True)
    texts = [r["text"] for r in retain if "text" in r]
    assert texts == [answers["Write a poem."] + "\n\n" + answers["Describe a market."]]
    assert stats["plain_text_records"] == 1
    from cmc_edge.train.data import normalize_record

    assert normalize_record({"text": texts[0]}, "retain.jsonl", 1) == {"text": texts[0]}


def test_attack_shapes_refuse_forgotten_facts_and_hold_kept_ones():
    facts = facts2()
    leads = {GOLD["question"]: ["The chemical symbol for gold is"]}
    attacks = fr.attack_prompts(facts, leads)
    assert len(attacks) == len(facts) * len(fd.ATTACK_SHAPES)
    hamlet = [p for f, p in attacks if f.split == "keep"]
    # a kept question offered among options stands beside forgotten answers
    options = next(p for p in hamlet if "Pick one" in p)
    assert "William Shakespeare" in options and ("Au" in options or "Fe" in options)
    # examples shown are kept facts, never the fact asked
    shown = next(p for f, p in attacks if f.question == GOLD["question"] and p.startswith("Question:"))
    assert shown.count("Question:") == 2 and HAMLET["question"] in shown and shown.endswith(f"{GOLD['question']}\nAnswer:")
    assert "Fill in the blank: The chemical symbol for gold is ____." in {p for _, p in attacks}
    answers = {p: "Shakespeare." for p in hamlet}
    forget, retain, stats = fr.build_records(facts, answers, [], [], attacks)
    gold = [r for r in forget if r["prompt"] in {p for f, p in attacks if f.split == "forget"}]
    assert len(gold) == 2 * len(fd.ATTACK_SHAPES)
    assert all(fd.is_refusal(r["response"]) and r["avoid"] for r in gold)
    assert {r["prompt"] for r in retain if r["response"] == "Shakespeare."} == set(hamlet)
    # the report card's probe battery is never a training prompt
    probes = {it["prompt"] for it in fr.probe_items(facts, leads)}
    assert not probes & {r["prompt"] for r in forget + retain}


def test_wrappers_are_disjoint():
    sets = [set(fd.TRAIN_WRAPPERS), set(fd.VALIDATION_WRAPPERS), set(fd.TEST_WRAPPERS)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_general_items_drop_facts_that_share_an_answer():
    facts = [Fact("Who wrote Macbeth?", "Shakespeare", "forget")]
    pool = [("Who wrote Romeo and Juliet?", ("Shakespeare",), "lit"), ("What is 2+2?", ("4",), "math")]
    assert [it["prompt"] for it in fr.general_items(facts, pool)] == ["What is 2+2?"]


def test_probe_battery_covers_every_kind_and_scores_attacks():
    facts = facts2()
    items = fr.probe_items(facts, {GOLD["question"]: ["The chemical symbol for gold is"]})
    assert len(items) == 2 * len(fd.PROBE_KINDS)
    assert {it["kind"] for it in items} == set(fd.PROBE_KINDS)
    mc = next(it for it in items if it["kind"] == "multiple-choice" and it["fact"] == GOLD["question"])
    assert f"{mc['option']}) Au" in mc["prompt"]
    comp = next(it for it in items if it["kind"] == "completion" and it["fact"] == GOLD["question"])
    assert "The chemical symbol for gold is" in comp["prompt"]
    assert fd.probe_leaked("confirm", "Yes, it is.", False)
    assert not fd.probe_leaked("confirm", "No.", True)
    assert fd.probe_leaked("multiple-choice", f"{mc['option']}) Au", True, mc["option"])
    other = "A" if mc["option"] != "A" else "B"
    assert not fd.probe_leaked("multiple-choice", f"{other}) Fe", False, mc["option"])


def test_summarize_outcomes_add_up():
    from cmc_edge.recipes.scaffold import Answer

    items = [{"split": "forget", "prompt": f"q{i}", "answers": ["Au"]} for i in range(4)]
    items.append({"split": "keep", "prompt": "q9", "answers": ["Fe"]})
    outs = ["It is Au.", "I'm sorry, I can't help with that.", "It is Ag.", " \n", "I'm sorry."]
    s = fr.summarize(fr.score(items, [Answer(i["prompt"], o, 3, 0.1) for i, o in zip(items, outs)]))
    assert s["forget"] == pytest.approx(1 / 4) and s["keep"] == 0.0
    # an empty reply withholds the answer without making one up: silent, not wrong
    assert s["outcomes"] == pytest.approx({"leaked": 1 / 4, "refused": 1 / 4, "silent": 1 / 4, "wrong": 1 / 4})
    assert s["refused_elsewhere"] == 1.0


BASE = {"forget": 0.8, "keep": 0.7, "general": 0.9, "refused_elsewhere": 0.05, "ppl": 10.0}


@pytest.mark.parametrize("measured, alpha, status", [
    # the strongest safe alpha forgets best; a stronger one that damages kept facts is refused
    ({0.5: {**BASE, "forget": 0.3}, 1.0: {**BASE, "forget": 0.0}, 1.5: {**BASE, "forget": 0.0, "keep": 0.4}}, 1.0, "ok"),
    # equal forgetting: the smaller alpha
    ({0.5: {**BASE, "forget": 0.0}, 1.0: {**BASE, "forget": 0.0}}, 0.5, "ok"),
    # safe but short of the bar
    ({1.0: {**BASE, "forget": 0.4}}, 1.0, "weak"),
    # validation prose is a small sample: a rise under the bar's 5% but past half of it is not safe
    # (companies, seed 1: +4.5% on validation was +7.6% on the test prose)
    ({0.75: {**BASE, "forget": 0.02, "ppl": 10.2}, 1.0: {**BASE, "forget": 0.0, "ppl": 10.45}}, 0.75, "ok"),
    # a refusal flood or a perplexity blow-up is never safe: collapse, smallest alpha returned
    ({0.5: {**BASE, "forget": 0.0, "refused_elsewhere": 0.9}, 1.0: {**BASE, "forget": 0.0, "ppl": 40.0}}, 0.5, "collapse"),
])
def test_choose_alpha(measured, alpha, status):
    got, st, reasons = fr.choose_alpha({0.0: BASE, **measured})
    assert (got, st) == (alpha, status)
    if status == "collapse":
        assert any("refusals" in r for r in reasons) and any("perplexity" in r for r in reasons)


def test_choose_alpha_on_a_model_that_never_gave_the_answers_takes_the_templates_strength_where_safe():
    blind = {**BASE, "forget": 0.0}
    m = {0.0: blind, 0.5: blind, 0.75: blind, 1.0: {**blind, "keep": 0.4}}
    # nothing to forget on this model: no forgetting to rank by, so the template's strength, or the
    # strongest safe one below it; never "weak" (which would retrain a filter for nothing)
    assert fr.choose_alpha({**m, 1.0: blind}, fallback=1.0)[:2] == (1.0, "unmeasured")
    assert fr.choose_alpha(m, fallback=1.0)[:2] == (0.75, "unmeasured")
    assert fr.choose_alpha(m, fallback=0.25)[:2] == (0.5, "unmeasured")
    assert fr.choose_alpha(m)[:2] == (0.5, "unmeasured")


def _cand(template_status, drop=1.0, other="ok"):
    m = {0.0: {"forget": 0.8}, 1.0: {"forget": 0.8 * (1 - drop)}}
    return {"validation": {"t": {"status": template_status, "alpha": 1.0, "measured": m},
                           "g": {"status": other, "alpha": 1.0, "measured": m}}}


def test_the_filter_trained_again_ships_only_if_safer_or_better_on_the_template():
    weak = _cand("weak", drop=0.8)
    assert fr.adopt_second(weak, _cand("ok"), "t")
    assert fr.adopt_second(weak, _cand("weak", drop=0.85), "t")            # short of the bar, but closer
    assert not fr.adopt_second(weak, _cand("weak", drop=0.8), "t")         # no better: the first stays
    assert not fr.adopt_second(weak, _cand("collapse"), "t")
    # better on the template, but unsafe on another checked model: the remedy must not bring damage
    assert not fr.adopt_second(weak, _cand("ok", other="collapse"), "t")
    # another model's shortfall alone is no reason to swap
    assert not fr.adopt_second(_cand("ok"), _cand("ok", other="weak"), "t")
    # a filter unsafe on no model beats one unsafe on another checked model, even if it forgets less
    assert fr.adopt_second(_cand("weak", drop=0.85, other="collapse"), _cand("weak", drop=0.8, other="weak"), "t")
    assert not fr.adopt_second(_cand("weak", drop=0.8, other="weak"), _cand("ok", other="collapse"), "t")
    # unsafe on some model either way: the better one on the template
    assert fr.adopt_second(_cand("weak", other="collapse"), _cand("ok", other="collapse"), "t")


def test_a_filter_is_trained_again_when_short_on_the_template_or_unsafe_on_any_checked_model():
    v = lambda t, g: {"t": {"status": t}, "g": {"status": g}}  # noqa: E731
    assert fr.retry_reasons(v("ok", "ok"), "t") == [] and fr.retry_reasons(v("ok", "weak"), "t") == []
    assert fr.retry_reasons(v("weak", "ok"), "t") == ["weak on t"]
    assert fr.retry_reasons(v("ok", "collapse"), "t") == ["collapse on g"]
    assert fr.retry_reasons(v("collapse", "collapse"), "t") == ["collapse on t", "collapse on g"]
    assert fr.retry_reasons(v("unmeasured", "ok"), "t") == []


def test_check_bar_compares_with_the_blocklist():
    def summary(forget, probe, keep, general, ppl, wrong):
        return {"forget": forget, "probe": probe, "keep": keep, "general": general, "ppl": ppl,
                "outcomes": {"leaked": forget, "refused": 1 - forget - wrong, "wrong": wrong}}
    res = {"alone": summary(0.7, 0.6, 0.7, 0.9, 30.0, 0.2), "filter": summary(0.05, 0.1, 0.68, 0.88, 30.5, 0.1),
           "blocklist": summary(0.0, 0.2, 0.7, 0.9, 30.0, 0.5)}
    bar = fr.check_bar(res)
    assert all(c["pass"] for c in bar.values())
    res["filter"]["outcomes"]["wrong"] = 0.6
    res["filter"]["ppl"] = 33.0
    bar = fr.check_bar(res)
    assert not bar["wrong_vs_blocklist"]["pass"] and not bar["ppl_rise"]["pass"]
    assert fr.unmeasured(res) == []


def test_facts_the_model_never_knew_leave_forgetting_unmeasured_not_failed():
    def summary(forget, probe, keep):
        return {"forget": forget, "probe": probe, "keep": keep, "general": 0.9, "ppl": 30.0,
                "outcomes": {"leaked": forget, "refused": 0.5, "wrong": 0.5 - forget}}
    res = {"alone": summary(0.0, 0.0, 0.7), "filter": summary(0.0, 0.0, 0.7), "blocklist": summary(0.0, 0.0, 0.7)}
    bar = fr.check_bar(res)
    assert "forget_drop" not in bar and "probe_drop" not in bar and fr.unmeasured(res) == ["forget", "probe"]
    assert bar["keep_points"]["pass"] and bar["ppl_rise"]["pass"]
    res["filter"]["keep"] = 0.3                      # the damage is still judged
    assert not fr.check_bar(res)["keep_points"]["pass"]


def test_retain_and_validation_questions_never_meet_the_test_split():
    from cmc_edge.eval.demo_data import UNRELATED_QUESTIONS

    test = {q.casefold() for q, *_ in UNRELATED_QUESTIONS}
    val = {q.casefold() for q, _ in fd.VALIDATION_GENERAL}
    retain = {q.casefold() for q in fd.RETAIN_QUESTIONS}
    assert not (test & val or test & retain or val & retain)
    assert not set(fd.VALIDATION_BROAD) & set(fd.RETAIN_QUESTIONS)


def test_choose_alpha_prefers_refusals_to_made_up_answers():
    m = {0.0: BASE, 0.5: {**BASE, "forget": 0.0, "outcomes": {"wrong": 0.8}},
         1.0: {**BASE, "forget": 0.0, "outcomes": {"wrong": 0.1}}}
    assert fr.choose_alpha(m)[:2] == (1.0, "ok")


def test_choose_alpha_allows_one_question_of_noise():
    base = {**BASE, "counts": {"general": 19, "keep": 36}}
    one = {**BASE, "forget": 0.0, "general": BASE["general"] - 1 / 19}
    two = {**BASE, "forget": 0.0, "general": BASE["general"] - 2 / 19}
    assert fr.choose_alpha({0.0: base, 1.0: one})[:2] == (1.0, "ok")
    assert fr.choose_alpha({0.0: base, 1.0: two})[1] == "collapse"


@pytest.mark.slow
def test_forget_command_end_to_end_on_the_tiny_model(tiny_gguf, tmp_path, capsys):
    """The user-level command: data, training, export, validation, check, report card; a filter that
    cannot be checked (the tiny model knows nothing) is never a PASS: exit code 1, never silent."""
    from cmc_edge.cli import main
    from cmc_edge.runtime.bundle import load_bundle

    facts = write(tmp_path, [GOLD, {**GOLD, "question": "What is the symbol of gold?", "answer": "Aurum"}, HAMLET])
    out = tmp_path / "filter"
    rc = main(["forget", str(facts), "--template", str(tiny_gguf), "--out", str(out), "--steps", "2",
               "--alpha", "1", "--alpha", "2", "--no-probes", "--system-prompt-baseline"])
    assert rc == 1
    printed = capsys.readouterr()
    assert ("verdict: FAIL" in printed.out or "verdict: UNVERIFIED" in printed.out) and "WARNING" in printed.err
    assert "verdict: PASS" not in printed.out
    for name in ("report.txt", "report.json", "answers.json", "report.png", "forget.jsonl", "retain.jsonl"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    assert rep["alpha"] in (1.0, 2.0) and set(rep["validation"]) == {"0.0", "1.0", "2.0"}
    # the tiny model knows none of the answers: forgetting is unmeasured, which is no reason to
    # train a second filter
    assert rep["status"] == "unmeasured" and len(rep["candidates"]) == 1 and not (out / "rejected").exists()
    # one kept fact: nothing of the forgotten kind is held out to judge the strength, and the user is told
    assert any("1 kept facts" in w for w in rep["warnings"]) and "1 kept facts" in printed.err
    bundle = load_bundle(out / "bundle")
    assert bundle.default_alpha == rep["alpha"] and "validation" in bundle.manifest["default_alpha_reason"]
    # one strength for every model unless --alpha-per-model: nothing per model in the bundle
    assert "model_alphas" not in bundle.manifest and not rep["config"]["alpha_per_model"]
    # the recipe's shift floor goes into the bundle, so every runtime that loads it drops the same shifts
    assert bundle.shift_floor == rep["config"]["shift_floor"] == fr.ForgetConfig().shift_floor > 0
    assert bundle.manifest["objective"] == "unlearn-idk"          # so `serve` enforces it by default
    # answered 8 prompts at a time by default; the check's time is reported per model
    assert rep["config"]["side_by_side"] == 8 and f"check {tiny_gguf}" in rep["timings"]
    rows = json.loads((out / "answers.json").read_text())["test"][str(tiny_gguf)]
    assert {"alone", "filter", "blocklist"} <= set(rows) and all(len(v) == len(rows["alone"]) for v in rows.values())
    # the system-prompt baseline, on the same items: told which questions not to answer, never their answers
    m = rep["models"][0]
    assert set(rows) == {"alone", "filter", "blocklist", "system_prompt"}
    assert m["system_prompt"]["counts"] == m["alone"]["counts"] and m["system_prompt"]["ppl"] is None
    assert m["system_prompt_seconds"] > 0 and rep["config"]["system_prompt_baseline"]
    said = m["system_prompt_text"]
    assert GOLD["question"] in said and "What is the symbol of gold?" in said and "Hamlet" not in said
    assert not {"Au", "Aurum"} & set(said.replace("?", " ").split())
    assert "sys prompt" in rep["table"]
    # an existing output is never overwritten by accident
    with pytest.raises(InputError, match="already exists"):
        fr.run_forget(facts, out, fr.ForgetConfig(template=str(tiny_gguf), steps=1))


def test_parse_names_reads_the_templates_list():
    assert fd.parse_names("1. Macbeth\n2. Othello - a tragedy\n3. King Lear, and Hamlet.", exclude=["Hamlet"]) == [
        "Macbeth", "Othello", "King Lear"]
    # a forgotten answer is never a sibling; a name inside another word is not that answer
    assert fd.parse_names("Paul Revere, Au, gold (Au), silver", exclude=["Au", "gold"]) == ["Paul Revere", "silver"]
    assert fd.parse_names("I'm sorry, I can't list those.") == []
    assert fd.parse_names("Emma, Ulysses, Dune", limit=2) == ["Emma", "Ulysses"]
    assert fd.parse_names("1. Faust: set in Germany\n2. heroic\n3. 7 Wonders", proper=True) == ["Faust", "7 Wonders"]
    assert fd.parse_names("") == []


def test_question_frame_marks_the_subject():
    assert fr.question_frame(Fact("Who wrote Hamlet?", "Shakespeare", "forget", (), "Hamlet")) == "Who wrote {s}?"
    assert fr.question_frame(Fact("Who wrote it?", "X", "forget", (), "Hamlet")) is None


def test_sibling_questions_ask_the_forgotten_wording_about_other_subjects():
    facts = [Fact("Who wrote Hamlet?", "Shakespeare", "forget", (), "Hamlet"),
             Fact("Who wrote Emma?", "Jane Austen", "keep", (), "Emma"),
             Fact("What is the chemical symbol for gold?", "Au", "forget", (), "gold")]
    (f1, p1), (f2, p2) = fr.sibling_list_prompts(facts)
    assert "Hamlet" in p1 and "gold" in p2
    answers = {p1: "Macbeth, Emma, Romeo and Juliet, Shakespeare's Sonnets, Dracula", p2: "silver, iron"}
    got = fr.sibling_prompts(facts, answers, exclude=("Who wrote Romeo and Juliet?",))
    cores = ["Who wrote Macbeth?", "Who wrote Dracula?", "What is the chemical symbol for silver?",
             "What is the chemical symbol for iron?"]
    # each in a training wrapper (never a validation or test one) and in an attack shape that needs
    # no answer; a kept fact's subject (Emma), a forgotten answer (Shakespeare) and an evaluation
    # question (Romeo and Juliet) are never asked
    shots = [("Who wrote Emma?", "Jane Austen")]
    assert sorted(got) == sorted([fd.wrap(fd.TRAIN_WRAPPERS[i % len(fd.TRAIN_WRAPPERS)], q) for i, q in enumerate(cores)]
                                 + [fd.attack_prompt(("bare", "examples")[i % 2], q, "", shots=shots, options=(), lead=None)
                                    for i, q in enumerate(cores)])
    assert any(p.startswith("Question: Who wrote Emma?\nAnswer: Jane Austen") for p in got)


def test_siblings_are_retain_data_with_forgotten_answers_cut_and_avoided():
    facts = [Fact("Who wrote Hamlet?", "Shakespeare", "forget", (), "Hamlet")]
    sib = "Who wrote Macbeth?"
    answers = {sib: "Macbeth was written by Shakespeare in 1606.", "Write a poem.": "Roses are red."}
    _, retain, stats = fr.build_records(facts, answers, ["Write a poem."], [sib])
    row = next(r for r in retain if r["prompt"] == sib)
    assert row["response"] == "Macbeth was written by" and row["avoid"] == ["Shakespeare"]
    assert stats["sibling_questions"] == [sib]


def test_held_out_kept_facts_are_never_trained_and_judge_the_strength():
    facts = [Fact("What is the chemical symbol for gold?", "Au", "forget", (), "gold")] + [
        Fact(f"What is the chemical symbol for {e}?", s, "keep", (), e)
        for e, s in (("silver", "Ag"), ("tin", "Sn"), ("zinc", "Zn"), ("neon", "Ne"), ("argon", "Ar"), ("boron", "B"))]
    kin = fr.held_out_keep(facts)
    assert [f.subject for f in kin] == ["zinc", "boron"]
    assert fr.held_out_keep(facts[:3]) == []
    trained = [f for f in facts if f not in kin]
    answers = {p: "It is Ag." for _, p in fr.keep_prompts(trained)}
    _, retain, _ = fr.build_records(trained, answers, [])
    assert retain and not any("zinc" in r["prompt"] or "boron" in r["prompt"] for r in retain)
    items = fr.validation_items(facts)
    assert {it["prompt"] for it in items if it["split"] == "kin"} == {
        fd.wrap(w, f.question) for f in kin for w in fd.VALIDATION_WRAPPERS}
    assert not any(it["split"] == "keep" and ("zinc" in it["prompt"] or "boron" in it["prompt"]) for it in items)
    # a filter that forgets but loses the held-out kept facts is not safe
    base = {**BASE, "kin": 1.0, "counts": {"kin": 4}}
    hurt = {**BASE, "forget": 0.0, "kin": 0.5}
    fine = {**BASE, "forget": 0.0, "kin": 1.0}
    assert fr.choose_alpha({0.0: base, 1.0: hurt})[1] == "collapse"
    assert fr.choose_alpha({0.0: base, 1.0: fine})[:2] == (1.0, "ok")


@pytest.mark.parametrize("kw, words", [({"side_by_side": 0}, "side-by-side"), ({"side_by_side": 2.5}, "side-by-side"),
                                       ({"steps": 0}, "steps"), ({"alphas": ()}, "alphas")])
def test_bad_recipe_settings_name_the_flag(kw, words):
    with pytest.raises(InputError, match=words):
        fr.ForgetConfig(**kw)


@pytest.mark.slow
@pytest.mark.parametrize("second_wins, per_model", [(True, False), (False, True)])
def test_a_filter_short_of_the_bar_is_trained_again_with_prose_and_the_better_one_ships(
        tiny_gguf, tmp_path, monkeypatch, second_wins, per_model):
    """By default a filter that validates "weak" is trained once more with plain-prose retain
    records; the one that validates better ships at the top of the run directory (its records,
    its bundle, its alpha), the other's records go to ``rejected/`` without weights. A checked
    model is validated at the template's strength only, or, with ``alpha_per_model``, at every
    strength, and its own choice is recorded in the bundle for its file. The second training runs
    the template only on records the first did not have, and the second validation takes each
    model's answers alone from the first."""
    import shutil

    import cmc_edge.recipes.scaffold as scaffold
    import cmc_edge.train.loop as loop

    from cmc_edge.models import model_digest
    from cmc_edge.runtime.bundle import load_bundle

    second = tmp_path / "other.gguf"               # a second model file (llama.cpp ignores trailing bytes)
    shutil.copyfile(tiny_gguf, second)
    with open(second, "ab") as fh:
        fh.write(b"\0" * 64)

    real = fr.validate_models
    calls = []

    def validate(bundle, models, facts, cfg, earlier=None):
        assert (earlier is None) == (not calls)
        got = real(bundle, models, facts, cfg, earlier)
        if earlier:
            assert all(got[n]["rows"][0.0] is earlier[n]["rows"][0.0] for n in got)
        first = not calls
        calls.append(bundle)
        status = "weak" if first else "ok" if second_wins else "collapse"
        alpha = 1.0 if first else 2.0
        out = {n: {**v, "status": status, "alpha": alpha if n == str(tiny_gguf) or not per_model else alpha / 2}
               for n, v in got.items()}
        if first and not second_wins:          # the first ships: unsafe on the other model, which is reported
            out[str(second)]["status"] = "collapse"
        return out

    run_template, strengths = [], []
    real_lp, real_answer_at = loop.template_logprobs, scaffold.answer_at

    def template_logprobs(model, examples, *a, **kw):
        run_template.append(len(examples))
        return real_lp(model, examples, *a, **kw)

    def answer_at(engine, prompts, settings, **kw):
        strengths.append([a for s in settings for a in s])
        return real_answer_at(engine, prompts, settings, **kw)

    monkeypatch.setattr(fr, "validate_models", validate)
    monkeypatch.setattr(loop, "template_logprobs", template_logprobs)
    monkeypatch.setattr(scaffold, "answer_at", answer_at)
    facts = write(tmp_path, [GOLD, HAMLET])
    out = tmp_path / "filter"
    rep = fr.run_forget(facts, out, fr.ForgetConfig(template=str(tiny_gguf), steps=1, alphas=(1.0, 2.0),
                                                    probes=False, check_models=(str(second),),
                                                    alpha_per_model=per_model))
    assert len(calls) == 2 and calls[1] != calls[0]
    # records: the first training ran them all through the template; the second only the prose ones
    first_dir, second_dir = (out / "rejected", out) if second_wins else (out, out / "rejected")
    n_first = sum(len((first_dir / f"{r}.jsonl").read_text().splitlines()) for r in ("forget", "retain"))
    n_prose = sum('"text"' in line for line in (second_dir / "retain.jsonl").read_text().splitlines())
    assert run_template == [n_first, n_prose] and n_prose > 0
    # the second filter continues the first: its weights, at most retry_steps (here --steps 1) steps
    if second_wins:
        tcfg = json.loads((out / "checkpoint" / "cmc.json").read_text())["train_config"]
        assert tcfg["steps"] == 1 and tcfg["lr"] == rep["config"]["lr"] / 2
        assert tcfg["init_from"] == fr.FIRST_FILTER          # not the deleted temporary checkpoint's path
    # validation: alpha 0 (each model alone) is answered for the first filter only
    assert [0.0 in s for s in strengths[:4]] == [True, True, False, False]   # then the test check
    assert [c["prose_retain"] for c in rep["candidates"]] == [False, True]
    # the system-prompt baseline is measured only when asked for (--system-prompt-baseline)
    assert all("system_prompt" not in m for m in rep["models"]) and "sys prompt" not in rep["table"]
    assert [c["chosen"] for c in rep["candidates"]] == [not second_wins, second_wins]
    top = [json.loads(line) for line in (out / "retain.jsonl").read_text().splitlines()]
    other = [json.loads(line) for line in (out / "rejected" / "retain.jsonl").read_text().splitlines()]
    assert any("text" in r for r in top) == second_wins and any("text" in r for r in other) != second_wins
    assert not (out / "rejected" / "bundle").exists() and not (out / "prose-retain").exists()
    bundle = load_bundle(out / "bundle")
    want = 2.0 if second_wins else 1.0
    assert rep["alpha"] == bundle.default_alpha == want
    # the other model: measured at every strength only when it gets its own
    measured = set(rep["model_validation"][str(second)]["measured"])
    assert measured == {"0.0", "1.0", "2.0"} if per_model else (len(measured) == 2 and "0.0" in measured)
    if per_model:
        assert bundle.alpha_for(model_digest(tiny_gguf)) == (want, "chosen for this model")
        assert bundle.alpha_for(model_digest(second)) == (want / 2, "chosen for this model")
        assert [m["alpha"] for m in rep["models"]] == [want, want / 2]
    else:
        assert "model_alphas" not in bundle.manifest and [m["alpha"] for m in rep["models"]] == [want, want]
    assert "trained twice" in rep["table"]
    unsafe = [w for w in rep["warnings"] if "safe on the validation split" in w]
    assert len(unsafe) == (0 if second_wins else 1)
    assert all(str(second) in w and "do not ship" not in w for w in unsafe)
