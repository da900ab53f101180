"""The instruction-transfer recipe's data and its format checker (pure functions, no model)."""

import json

import pytest

from cmc_edge.eval import demo_data as dd
from cmc_edge.recipes.json_recipe import (build_eval_items, build_train_records, first_sentence, parse_json_answer,
                                          train_prompts)


@pytest.mark.parametrize("text, answer", [
    ('{"answer": "Paris"}', "Paris"),
    ('  {"answer": "Paris"}\n', "Paris"),
    ('{"answer": "Rome", "note": "x"}', "Rome"),
    ('{"answer": "Paris"} The capital.', None),      # anything after the object breaks the format
    ('The answer is {"answer": "Paris"}', None),
    ('{"answer": 3}', None),
    ('{"reply": "Paris"}', None),
    ('["Paris"]', None),
    ('{"answer": "Par', None),                        # cut off
    ("", None),
])
def test_parse_json_answer(text, answer):
    assert parse_json_answer(text) == answer


def test_first_sentence():
    assert first_sentence("Boil water. Then add the egg.") == "Boil water."
    assert first_sentence("Roses are red\nViolets are blue") == "Roses are red"
    assert len(first_sentence("word " * 100, limit=40)) <= 40


def test_train_records_wrap_the_templates_own_answers_and_eval_is_held_out():
    countries = dd.known_by("smollm2", "gemma3")[:5]
    prompts = train_prompts(countries, ["Write a poem.", "Explain tea."], forms_per_country=3, seed=0)
    assert prompts == train_prompts(countries, ["Write a poem.", "Explain tea."], forms_per_country=3, seed=0)
    assert len(prompts) == 5 * (3 + 1) + sum(1 for c in countries if dd.country_by_name(c).language) * 2 + 50 + 2
    answers = ["The capital is X. It is big."] * (len(prompts) - 2) + ["Waves roll. Gulls cry.", ""]
    recs = build_train_records(prompts, answers, seed=0)
    assert all(parse_json_answer(r["response"]) for r in recs)
    assert {"prompt": "Write a poem.", "response": json.dumps({"answer": "Waves roll."}), "keep": ["Waves roll."],
            "teacher": "Waves roll."} in recs
    assert all(r["response"].endswith(r["keep"][0] + '"}') and r["keep"][0] in r["teacher"] for r in recs)
    quoted = build_train_records(["Say hi."], ['"Hello there," she said.'], seed=0)[0]
    assert quoted["keep"] == ['there,\\" she said.'] and "teacher" not in quoted   # escaped: held in place
    assert not any(r["prompt"] == "Explain tea." for r in recs)            # empty template answers are dropped
    items = build_eval_items(countries)
    assert {it["kind"] for it in items} == {"capital", "attribute", "general"}
    assert not set(prompts) & {it["question"] for it in items}
    assert {it.get("attribute") for it in items if it["kind"] == "attribute"} <= {"continent", "currency"}
