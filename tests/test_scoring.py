"""Refusal detection (eval/scoring.py): what the forget report and `cmc-edge eval`'s refusal flag count."""

import pytest

from cmc_edge.eval.scoring import is_refusal


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, I don't know.", True),
    ("I’m not able to share that information.", True),             # typographic apostrophe
    ("I cannot help with that request.", True),
    ("The chemical symbol for gold is something I can't share.", True),
    ("Unable to answer.", True),
    ("I can not share.", True),                                      # "can not" in two words (Gemma 3, dates)
    ("I Can Not tell you that.", True),
    ("A penguin can not only swim but also dive.", False),
    ("The chemical symbol for gold is Au.", False),
    ("Shakespeare wrote it.", False),
    ("Sorrento is a town in Italy.", False),                         # whole words only
    ("", False),
    ("Paris. " * 40 + "Sorry.", False),                              # only the first 200 characters count
])
def test_is_refusal(text, refused):
    assert is_refusal(text) is refused


def test_is_refusal_is_re_exported_for_the_forget_recipe():
    from cmc_edge.recipes import forget_data

    assert forget_data.is_refusal is is_refusal
