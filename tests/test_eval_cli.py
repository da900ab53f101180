"""`cmc-edge eval`: each model at alpha 0 and at each alpha, recall and ROUGE-L per split, JSON out."""

from __future__ import annotations

import json

import pytest

from cmc_edge.cli import main
from cmc_edge.eval.evaluate import flag_rows, format_eval_table, read_eval_items, rouge_l_recall


def test_rouge_l_recall():
    assert rouge_l_recall("Paris is the capital", "Paris is the capital") == 1.0
    assert rouge_l_recall("nothing in common", "Paris is the capital") == 0.0
    assert rouge_l_recall("the capital is Paris", "Paris is the capital of France") == 2 / 6   # LCS "the capital"
    assert rouge_l_recall("Paris, France.", "paris france") == 1.0                            # normalised words


@pytest.mark.parametrize("line, problem", [
    ('{"answers": ["x"]}', '"question" string is required'),
    ('{"question": "q"}', 'give "answers" and/or "reference"'),
    ('{"question": "q", "answers": []}', '"answers" must be a non-empty list'),
    ('{"question": "q", "reference": 3}', '"reference" must be a non-empty string'),
    ('not json', "invalid JSON"),
])
def test_bad_items_name_the_line_and_the_fix(tmp_path, line, problem):
    f = tmp_path / "items.jsonl"
    f.write_text('{"question": "ok?", "answers": ["yes"]}\n' + line + "\n")
    with pytest.raises(Exception, match=problem) as err:
        read_eval_items(f)
    assert ":2:" in str(err.value) and err.value.fix


def test_eval_runs_each_model_at_alpha_zero_and_each_alpha(tiny_gguf, tmp_path, capsys):
    from tiny_checkpoint import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "The capital of France", "answers": ["Paris"], "split": "forget"},
        {"question": "Hello world", "reference": "Hello world 1234", "split": "retain"},
    ]))
    text = tmp_path / "text.txt"
    text.write_text("The capital of Italy is Rome, and the capital of Spain is Madrid.")
    out = tmp_path / "res.json"
    argv = ["eval", "--delta", str(bundle), "--model", str(tiny_gguf), "--items", str(items), "--alpha", "1.5",
            "--text", str(text), "--max-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "forget rec" in table and "retain rougeL" in table and "retain nll" in table and "flags" in table
    res = json.loads(out.read_text())
    assert [r["alpha"] for r in res["rows"]] == [0.0, 1.5]
    assert res["flag_limits"] == {"ppl_rise": 0.10, "refusal_points": 20.0}
    for r in res["rows"]:
        assert r["splits"]["forget"]["recall"] in (0.0, 1.0) and r["splits"]["forget"]["rouge_l_recall"] is None
        assert {s: v["refusal_rate"] for s, v in r["splits"].items()} == {   # the tiny model never declines
            "forget": 0.0, "retain": 0.0}
        assert r["refusal_rate"] == 0.0 and isinstance(r["flags"], list)
        assert 0.0 <= r["splits"]["retain"]["rouge_l_recall"] <= 1.0
        assert r["splits"]["retain"]["reference_nll"] > 0.0
        assert r["perplexity"] > 1.0
    assert res["rows"][0]["perplexity"] != res["rows"][1]["perplexity"]     # the delta changes the scores
    assert res["rows"][0]["splits"]["retain"]["reference_nll"] != res["rows"][1]["splits"]["retain"]["reference_nll"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["samples"]) == 2
    assert main(argv) == 2                                                     # never overwrites silently


def test_eval_scores_the_graph_generate_runs(tiny_gguf, tmp_path):
    """eval runs what generate runs: the INT8 graph by default, fp32 with `--fp32` (scores close but
    each its own); the variant is recorded."""
    from tiny_checkpoint import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"question": "Hello world", "reference": "Hello world 1234", "split": "retain"}) + "\n")
    nll = {}
    for flag in (["--fp32"], []):
        out = tmp_path / f"res{len(flag)}.json"
        assert main(["eval", "--delta", str(bundle), "--model", str(tiny_gguf), "--items", str(items), "--alpha", "1.5",
                     "--max-tokens", "4", "--out", str(out), *flag]) == 0
        res = json.loads(out.read_text())
        assert res["variant"] == ("fp32" if flag else "int8")
        nll[res["variant"]] = [r["splits"]["retain"]["reference_nll"] for r in res["rows"]]
    assert nll["int8"][0] == nll["fp32"][0]                      # alpha 0: no delta at all
    assert nll["int8"][1] != nll["fp32"][1] and abs(nll["int8"][1] - nll["fp32"][1]) < 0.5


def _row(alpha, ppl=None, refusals=None, model="m"):
    return {"model": model, "alpha": alpha, "perplexity": ppl, "refusal_rate": refusals, "tokens_per_s": 10.0,
            "splits": {}}


@pytest.mark.parametrize("base, row, flags", [
    (_row(0.0, 20.0, 0.05), _row(1.0, 21.9, 0.05), []),                        # +9.5%: within 10%
    (_row(0.0, 20.0, 0.05), _row(1.0, 22.2, 0.05), ["PPL+11%"]),
    (_row(0.0, 29.6, 0.0), _row(1.0, 1994.0, 0.0), ["PPL+6636%"]),              # issue 17's collapse
    (_row(0.0, 20.0, 0.05), _row(1.0, 10.0, 0.05), []),                        # perplexity falling is no damage
    (_row(0.0, None, 0.05), _row(1.0, None, 0.05), []),                        # no --text: nothing to compare
    (_row(0.0, 20.0, 0.10), _row(1.0, 20.0, 0.30), []),                        # +20 points: at the limit
    (_row(0.0, 20.0, 0.10), _row(1.0, 20.0, 0.31), ["REFUSALS 31%"]),
    (_row(0.0, 20.0, 0.50), _row(1.0, 20.0, 0.65), []),                        # the model refused before too
    (_row(0.0, 20.0, 0.0), _row(1.0, 30.0, 0.95), ["PPL+50%", "REFUSALS 95%"]),
    (_row(0.0, 20.0, 0.0, model="a"), _row(1.0, 30.0, 0.95, model="b"), []),   # another model's baseline
])
def test_flags_compare_each_alpha_with_the_same_model_at_alpha_zero(base, row, flags, caplog):
    with caplog.at_level("WARNING", logger="cmc_edge.eval.evaluate"):
        flag_rows([base, row])
    assert base["flags"] == [] and row["flags"] == flags
    warned = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warned) == (1 if flags else 0)
    if flags:
        assert all(f in warned[0].getMessage() for f in flags)


def test_flags_column_in_the_table():
    rows = flag_rows([_row(0.0, 20.0, 0.0), _row(0.5, 20.5, 0.1), _row(1.0, 40.0, 0.9)])
    lines = format_eval_table({"rows": rows}).splitlines()
    assert lines[0].split()[-1] == "flags"
    assert [line.split("  ")[-1] for line in lines[2:]] == ["-", "-", "PPL+100%, REFUSALS 90%"]
