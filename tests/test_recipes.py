"""The recipes layer: one scaffold (run directory, answer loop, training and export) under the demo
and the JSON recipe. The recipes run end to end on the tiny GGUF, with training replaced by a tiny
bundle, so what is checked is the wiring: data written, the training configuration each recipe
asks for, evaluation through the one answer loop, and the report."""

from __future__ import annotations

import json

import pytest

from cmc_edge.eval import demo_data as dd
from cmc_edge.recipes import scaffold


def test_new_run_dir_is_new_and_empty_even_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(scaffold.time, "strftime", lambda fmt: fmt.replace("%Y%m%d-%H%M%S", "20260101-000000"))
    root = tmp_path / "runs"
    first = scaffold.new_run_dir(root, "demo")
    (first / "results.json").write_text("{}")
    second = scaffold.new_run_dir(root, "demo")
    assert first.name == "demo-20260101-000000" and second.name == "demo-20260101-000000-2"
    assert list(second.iterdir()) == [] and (first / "results.json").read_text() == "{}"
    assert scaffold.new_run_dir(root, "json").name == "json-20260101-000000"


class _Answer:
    def __init__(self, text, tokens, seconds):
        self.text, self.tokens, self.seconds = text, tokens, seconds


@pytest.mark.parametrize("answers, want", [
    ([_Answer("a", 10, 1.0), _Answer("b", 30, 1.0)], 20.0),
    ([_Answer("a", 5, 0.5)], 10.0),
])
def test_tokens_per_second_pools_all_answers(answers, want):
    assert scaffold.tokens_per_second(answers) == want


def test_tokens_per_second_of_nothing_is_nan():
    assert scaffold.tokens_per_second([]) != scaffold.tokens_per_second([])


@pytest.fixture()
def tiny_recipe(tiny_gguf, monkeypatch):
    """Both recipe models resolve to the tiny GGUF; the template answers every prompt alike; training
    is recorded and replaced by the tiny bundle."""
    import cmc_edge.models
    from tiny_checkpoint import make_tiny_bundle

    trained = []

    def fake_train_and_export(run_dir, template_path, train_cfg, roles=("forget", "retain"), **kw):
        trained.append({"run_dir": run_dir, "template": template_path, "cfg": train_cfg, "roles": roles,
                        "records": {r: (run_dir / f"{r}.jsonl").read_text().splitlines() for r in roles}})
        return make_tiny_bundle(run_dir / "bundle")

    monkeypatch.setattr(cmc_edge.models, "resolve_model", lambda name: tiny_gguf)
    monkeypatch.setattr(scaffold, "train_and_export", fake_train_and_export)
    monkeypatch.setattr(scaffold, "template_answers", lambda path, prompts, n: ["The answer is here."] * len(prompts))
    return trained


def _run_cli(argv, root, prefix, capsys):
    """`cmc-edge ARGV --out ROOT`: its run directory and results; the CLI prints the table and the
    directory and exits 1 when a bar fails."""
    from cmc_edge.cli import main

    rc = main([*argv, "--out", str(root)])
    out = capsys.readouterr().out
    (run,) = root.iterdir()
    assert run.name.startswith(prefix + "-")
    res = json.loads((run / "results.json").read_text())
    assert rc == (0 if all(c["pass"] for m in res["models"] for c in m["bar"].values()) else 1)
    assert res["table"] in out and f"run directory: {run}" in out and res["run_dir"] == str(run)
    return run, res


def test_demo_runs_on_the_scaffold_with_its_own_training_config(tiny_recipe, tmp_path, monkeypatch, capsys):
    real_items = dd.build_eval_items

    def four_per_split(split):
        items = real_items(split)
        return [it for s in ("forget", "retain", "unrelated") for it in [x for x in items if x["split"] == s][:4]]

    monkeypatch.setattr(dd, "build_eval_items", four_per_split)
    run, res = _run_cli(["demo", "--quick"], tmp_path / "runs", "demo", capsys)
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((run / "eval_items.json").read_text())) == 6       # --quick: every other item

    (t,) = tiny_recipe
    assert t["run_dir"] == run and t["roles"] == ("forget", "retain")
    c = t["cfg"]
    assert (c.objective, c.steps, c.kl_weight, c.lr, c.batch_size, c.size) == ("unlearn-idk", 120, 2.0, 2e-3, 16, "15m")
    forget = [json.loads(x) for x in t["records"]["forget"]]
    retain = [json.loads(x) for x in t["records"]["retain"]]
    assert forget and all(r["avoid"] for r in forget)
    assert sum(r["response"] == "The answer is here." for r in retain) == len(dd.BROAD_PROMPTS)
    assert [m["model"] for m in res["models"]] == ["smollm2", "gemma3"]
    for m in res["models"]:
        for cond in ("base", "filtered"):
            assert {s: m[cond][s]["total"] for s in ("forget", "retain", "unrelated")} == {
                "forget": 2, "retain": 2, "unrelated": 2}
            assert m[cond]["perplexity"] > 1.0 and m[cond]["tokens_per_s"] > 0
        assert set(m["bar"]) == {"forget_drop_rel", "retain_points", "unrelated_points", "ppl_rise"}


def test_json_recipe_runs_on_the_scaffold_with_its_own_training_config(tiny_recipe, tmp_path, monkeypatch, capsys):
    from cmc_edge.recipes import json_recipe as jr

    real_items = jr.build_eval_items
    monkeypatch.setattr(jr, "build_eval_items", lambda countries: real_items(countries)[::60])
    run, res = _run_cli(["demo", "--recipe", "json", "--steps", "7"], tmp_path / "runs", "json", capsys)

    (t,) = tiny_recipe
    assert t["roles"] == ("sft",)
    c = t["cfg"]
    assert (c.objective, c.steps, c.kl_weight, c.delta_ends_turn) == ("sft", 7, 3.0, True)
    recs = [json.loads(x) for x in t["records"]["sft"]]
    assert recs and all(jr.parse_json_answer(r["response"]) == "The answer is here." for r in recs)
    n = len(json.loads((run / "eval_items.json").read_text()))
    for m in res["models"]:
        for cond in ("base", "delta"):
            assert len(m[cond]["samples"]) == n
            assert m[cond]["adherence"] == sum(jr.parse_json_answer(s["output"]) is not None
                                               for s in m[cond]["samples"]) / n


def test_instruct_recipe_runs_on_the_scaffold_with_its_own_training_config(tiny_recipe, tmp_path, monkeypatch,
                                                                          capsys):
    from cmc_edge.cli import main
    from cmc_edge.recipes import instruct as ins

    monkeypatch.setattr(ins, "TASKS", ins.TASKS[:10])
    monkeypatch.setattr(scaffold, "template_answers", lambda path, prompts, n: [
        "Bees need care. A keeper checks the hives. Honey comes in summer. Smoke keeps bees calm."] * len(prompts))
    assert main(["demo", "--recipe", "instruct", "--steps", "5", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert run.name.startswith("instruct-") and res["table"] in out and f"--delta {res['bundle']}" in out

    (t,) = tiny_recipe
    assert t["roles"] == ("sft", "retain")
    c = t["cfg"]
    assert (c.objective, c.steps, c.delta_ends_turn, c.max_len) == ("sft", 5, True, 256)
    sft = [json.loads(x) for x in t["records"]["sft"]]
    retain = [json.loads(x) for x in t["records"]["retain"]]
    assert [r["prompt"] for r in retain] == [task for task, _ in ins.split_tasks(ins.TASKS)[0]]
    assert sft and all(r["prompt"] not in {x["prompt"] for x in retain} for r in sft)
    items = json.loads((run / "check_items.json").read_text())
    assert len(items) == 2 * 3                      # two held-out tasks, three prompts each
    for m in res["models"]:
        for cond in ("base", "delta"):
            rows = m[cond]["samples"]
            assert len(rows) == len(items)
            assert m[cond]["prompt_strict"] == sum(all(v["strict"] for v in r["verdicts"]) for r in rows) / len(rows)
