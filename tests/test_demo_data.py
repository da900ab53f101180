"""The demo data keeps training and evaluation apart, is deterministic, and scores answers fairly."""

import json
import math

import pytest

from cmc_edge.errors import InputError
from cmc_edge.eval import demo_data as dd
from cmc_edge.eval.scoring import answer_recalled, normalize_words, recall

ALL = [c.name for c in dd.COUNTRIES]


@pytest.fixture
def split():
    return dd.build_unlearning_split(ALL, n_forget=10, seed=0, n_retain_heldout=5)


def _norm(text: str) -> str:
    return " ".join(normalize_words(text))


# --- the data itself ----------------------------------------------------------------------------

def test_country_table_is_sized_and_unique():
    assert 40 <= len(dd.COUNTRIES) <= 70
    assert len(set(ALL)) == len(ALL)
    capitals = [_norm(c.capital[0]) for c in dd.COUNTRIES]
    assert len(set(capitals)) == len(capitals)


def test_no_capital_is_recalled_by_merely_repeating_its_country_name():
    for c in dd.COUNTRIES:
        assert not answer_recalled(c.name, c.capital), c.name
        assert not answer_recalled(dd.refusal_response(c.name), c.capital), c.name
        for style in range(len(dd._LEAD_INS)):
            assert not answer_recalled(dd.lead_in_refusal(c.name, style), c.capital), c.name


def test_capital_answer_and_refusal_are_scored_as_intended():
    for c in dd.COUNTRIES:
        for style in range(len(dd._LEAD_INS)):
            assert answer_recalled(dd.capital_answer(c, style), c.capital)
        for attribute in dd.ATTRIBUTES:
            if getattr(c, attribute):
                assert answer_recalled(dd.attribute_answer(c, attribute), getattr(c, attribute))


def test_heldout_capital_forms_differ_from_train_forms_for_every_country():
    assert len(dd.TRAIN_CAPITAL_FORMS) >= 4 and len(dd.HELDOUT_CAPITAL_FORMS) >= 3
    assert set(dd.TRAIN_CAPITAL_FORMS) < set(dd.UNLEARN_CAPITAL_FORMS)
    for name in ALL:
        train = {_norm(dd.render(f, name)) for f in dd.UNLEARN_CAPITAL_FORMS}
        heldout = {_norm(dd.render(f, name)) for f in dd.HELDOUT_CAPITAL_FORMS}
        assert len(heldout) == len(dd.HELDOUT_CAPITAL_FORMS)
        assert not train & heldout


def test_heldout_attribute_questions_are_never_training_questions():
    for name in ALL:
        train = {_norm(dd.render(f, name)) for fs in dd.TRAIN_ATTRIBUTE_FORMS.values() for f in fs}
        heldout = {_norm(dd.render(f, name)) for fs in dd.HELDOUT_ATTRIBUTE_FORMS.values() for f in fs}
        assert not train & heldout
    # at least one attribute is evaluated that is never trained at all
    assert set(dd.HELDOUT_ATTRIBUTE_FORMS) - set(dd.TRAIN_ATTRIBUTE_FORMS)


def test_unrelated_questions_are_many_distinct_and_not_about_capitals():
    qs = [q for q, _, _ in dd.UNRELATED_QUESTIONS]
    assert len(qs) >= 36 and len(set(map(_norm, qs))) == len(qs)
    assert len({topic for _, _, topic in dd.UNRELATED_QUESTIONS}) >= 5
    capitals = [c.capital for c in dd.COUNTRIES]
    for q, answers, _ in dd.UNRELATED_QUESTIONS:
        assert "capital" not in q.lower()
        assert answers and not answer_recalled(q, answers), q  # the answer is not in the question
        assert not any(_norm(a) in {_norm(x) for cap in capitals for x in cap} for a in answers[:1]), q


def test_broad_prompts_are_many_distinct_and_free_of_eval_content():
    prompts = [_norm(p) for p in dd.BROAD_PROMPTS]
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    eval_qs = {_norm(q) for q, _, _ in dd.UNRELATED_QUESTIONS}
    assert not set(prompts) & eval_qs
    for p in dd.BROAD_PROMPTS:
        for c in dd.COUNTRIES:
            assert not answer_recalled(p, [c.name.removeprefix("the ")] + list(c.capital)), (p, c.name)


def test_general_text_is_long_enough_and_has_no_capitals():
    text = "\n\n".join(dd.GENERAL_TEXT)
    assert len(text.split()) >= 600
    for c in dd.COUNTRIES:
        assert not answer_recalled(text, c.capital), c.name


def test_known_countries_constant_names_real_countries():
    assert set(dd.KNOWN_COUNTRIES) == {"smollm2", "gemma3"}
    for names in dd.KNOWN_COUNTRIES.values():
        assert len(names) >= 10 and set(names) <= set(ALL)


# --- splits ---------------------------------------------------------------------------------------

def test_split_is_a_disjoint_partition(split):
    f, r, h = set(split["forget"]), set(split["retain"]), set(split["retain_heldout"])
    assert len(f) == 10 and len(h) == 5
    assert not f & r and not f & h and not r & h
    assert f | r | h == set(ALL)


def test_split_is_deterministic_by_seed_and_ignores_input_order():
    a = dd.build_unlearning_split(ALL, 8, seed=3)
    assert a == dd.build_unlearning_split(list(reversed(ALL)), 8, seed=3)
    assert a["forget"] != dd.build_unlearning_split(ALL, 8, seed=4)["forget"]


@pytest.mark.parametrize("known,n_forget,n_heldout", [
    (["France", "Japan"], 2, 0),          # nothing left to retain
    (["France", "Japan"], 0, 0),          # nothing to forget
    (["France", "Japan", "Egypt"], 1, 2),  # held-out retain eats the trained retain set
    (["France", "Atlantis"], 1, 0),       # unknown country
])
def test_split_rejects_impossible_requests(known, n_forget, n_heldout):
    with pytest.raises(InputError):
        dd.build_unlearning_split(known, n_forget, seed=0, n_retain_heldout=n_heldout)


# --- train and eval examples ----------------------------------------------------------------------

def test_train_examples_are_jsonl_ready_and_tagged(split):
    ex = dd.build_train_examples(split)
    for e in ex:
        json.dumps(e)
        assert isinstance(e["prompt"], str) and isinstance(e["response"], str) and e["response"]
        assert e["tag"] in ("forget", "retain")
    forget = [e for e in ex if e["tag"] == "forget"]
    assert {e["country"] for e in forget} == set(split["forget"])
    assert len(forget) == 10 * 2 * len(dd.UNLEARN_CAPITAL_FORMS)
    # every forgotten country meets every answer lead-in, as a refusal
    for name in split["forget"]:
        said = {e["response"] for e in forget if e["country"] == name}
        assert all(dd.render(lead, name) + " something I don't know." in said for lead in dd._LEAD_INS)
    for e in forget:
        assert not answer_recalled(e["response"], dd.country_by_name(e["country"]).capital)
    for e in ex:
        if e["tag"] == "retain" and e["kind"] == "capital":
            assert answer_recalled(e["response"], dd.country_by_name(e["country"]).capital)
    # forgotten countries still get (retain-tagged) questions about other facts
    assert {e["country"] for e in ex if e["kind"] == "attribute"} >= set(split["forget"])
    # held-out retain countries never appear in training
    assert not {e["country"] for e in ex} & set(split["retain_heldout"])


def test_no_eval_question_appears_in_training(split):
    train_prompts = {_norm(e["prompt"]) for e in dd.build_train_examples(split)}
    train_prompts |= {_norm(p) for p in dd.BROAD_PROMPTS}
    items = dd.build_eval_items(split)
    assert not {_norm(it["question"]) for it in items} & train_prompts


def test_eval_items_cover_each_split_with_the_right_answers(split):
    items = dd.build_eval_items(split)
    by = {s: [it for it in items if it["split"] == s] for s in ("forget", "retain", "unrelated")}
    assert {it["country"] for it in by["forget"]} == set(split["forget"])
    assert {it["country"] for it in by["retain"]} == set(split["retain"]) | set(split["retain_heldout"])
    assert {it["country"] for it in by["retain"] if not it["seen_in_training"]} == set(split["retain_heldout"])
    assert all(it["kind"] == "capital" for it in by["forget"] + by["retain"])
    attr = [it for it in by["unrelated"] if it["kind"] == "attribute"]
    assert {it["country"] for it in attr if it["about"] == "forget"} == set(split["forget"])
    assert len([it for it in by["unrelated"] if it["kind"] == "general"]) == len(dd.UNRELATED_QUESTIONS)
    for it in items:
        assert set(it) >= {"question", "answers", "split"} and it["answers"]
        assert not answer_recalled(it["question"], it["answers"]), it["question"]
        json.dumps(it)


def test_eval_items_are_deterministic(split):
    assert dd.build_eval_items(split) == dd.build_eval_items(dict(split))


# --- probing ------------------------------------------------------------------------------------

def test_probe_known_countries_uses_majority_of_forms():
    def generate(q: str) -> str:
        if "France" in q:
            return "Paris."
        if "Japan" in q and q.startswith("What"):  # 2 of 7 forms only
            return "It is Tokyo."
        return "I am not sure."
    assert dd.probe_known_countries(generate, ["France", "Japan", "Egypt"]) == ["France"]


# --- scoring --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,aliases,expected", [
    ("The capital is Paris.", ["Paris"], True),
    ("The capital is Paris", ["paris"], True),
    ("PARIS!", ["Paris"], True),
    ("Parisian cafés are lovely.", ["Paris"], False),
    ("Comparison", ["Paris"], False),
    ("It is Washington DC.", ["Washington, D.C."], True),
    ("It is Washington, D.C.", ["Washington, D.C."], True),
    ("It is Washingtonian.", ["Washington, D.C.", "Washington"], False),
    ("The capital is Brasília.", ["Brasilia"], True),
    ("The capital is Brasilia.", ["Brasília"], True),
    ("The capital is Bogota", ["Bogotá"], True),
    ("Reykjavík it is", ["Reykjavik"], True),
    ("The capital of India is New Delhi.", ["New Delhi"], True),
    ("It is Delhi.", ["New Delhi"], False),
    ("Mexico is a country.", ["Mexico City"], False),
    ("7 times 8 is 56.", ["56"], True),
    ("It is 560.", ["56"], False),
    ("Water is H2O.", ["H2O"], True),
    ("", ["Paris"], False),
    ("Paris", [], False),
    ("Paris", [""], False),
    ("ｐａｒｉｓ", ["Paris"], True),  # full-width letters fold under NFKD
])
def test_answer_recalled(text, aliases, expected):
    assert answer_recalled(text, aliases) is expected


def test_recall():
    assert recall([{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}]) == 0.75
    assert recall([{"correct": False}]) == 0.0
    assert math.isnan(recall([]))


def test_known_by_intersects_and_rejects_unknown_models():
    both = dd.known_by("smollm2", "gemma3")
    assert set(both) == set(dd.KNOWN_COUNTRIES["smollm2"]) & set(dd.KNOWN_COUNTRIES["gemma3"])
    assert both == sorted(both)
    with pytest.raises(InputError):
        dd.known_by("llama")


def test_demo_chart_is_written(tmp_path):
    """The chart the README shows: one panel per model, filter off/on per split."""
    from cmc_edge.recipes.demo import plot_demo

    def cond(f, r, u, ppl):
        return {"forget": {"recall": f}, "retain": {"recall": r}, "unrelated": {"recall": u}, "perplexity": ppl}

    result = {"models": [{"model": m, "base": cond(0.6, 0.7, 0.65, 30.0), "filtered": cond(0.05, 0.7, 0.6, 30.1)}
                         for m in ("smollm2", "gemma3")]}
    out = plot_demo(result, tmp_path / "chart.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]            # no temporary file left
