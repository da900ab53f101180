"""The demo data keeps training and evaluation apart, is deterministic, and scores answers fairly."""

import math

import pytest

from cmc_edge.errors import InputError
from cmc_edge.eval import demo_data as dd
from cmc_edge.eval.scoring import answer_recalled, normalize_words, recall

ALL = [c.name for c in dd.COUNTRIES]


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


def test_heldout_capital_forms_differ_from_train_forms_for_every_country():
    assert len(dd.TRAIN_CAPITAL_FORMS) >= 4 and len(dd.HELDOUT_CAPITAL_FORMS) >= 3
    for name in ALL:
        train = {_norm(dd.render(f, name)) for f in dd.TRAIN_CAPITAL_FORMS}
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


# --- the capital demo's facts file -----------------------------------------------------------------

def test_capital_facts_file_is_the_table_and_known_by_both_models():
    """`cmc-edge demo` runs this file through `cmc-edge forget`: every country in it is one both
    models answer, its answers are the table's, and six are forgotten."""
    from cmc_edge.recipes.demo import CAPITAL_FACTS
    from cmc_edge.recipes.facts import read_facts

    facts = read_facts(CAPITAL_FACTS)
    assert sorted(f.subject for f in facts) == dd.known_by("smollm2", "gemma3")
    assert sum(f.split == "forget" for f in facts) == 6 and sum(f.split == "keep" for f in facts) >= 30
    for f in facts:
        c = dd.country_by_name(f.subject)
        assert set(f.answers) == set(c.capital) and f.question == dd.render(dd.TRAIN_CAPITAL_FORMS[0], c.name)


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
