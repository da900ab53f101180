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


@pytest.mark.slow
def test_demo_is_the_forget_recipe_on_the_capital_facts(tiny_recipe, tmp_path, capsys):
    """`cmc-edge demo` is `cmc-edge forget` on the packaged capital facts, checked on the template and
    the second model, with the demo's own bar on top of the recipe's report."""
    from cmc_edge.recipes.demo import CAPITAL_FACTS

    run, res = _run_cli(["demo", "--quick"], tmp_path / "runs", "demo", capsys)
    report = json.loads((run / "filter" / "report.json").read_text())
    assert report["facts"] == str(CAPITAL_FACTS) and res["forget_verdict"] == report["verdict"]
    for name in ("report.txt", "report.png", "answers.json", "forget.jsonl", "retain.jsonl"):
        assert (run / "filter" / name).is_file(), name
    (t,) = tiny_recipe
    assert t["run_dir"].parent == run and t["roles"] == ("forget", "retain")          # the filter dir, while written
    assert (t["cfg"].objective, t["cfg"].steps) == ("unlearn-idk", 120)           # --quick
    forget = [json.loads(x) for x in t["records"]["forget"]]
    assert forget and all(set(r["avoid"]) & {"Dhaka", "Jakarta", "Kathmandu", "Oslo", "Moscow", "Riyadh"}
                          for r in forget)
    assert len(report["models"]) == 2 and "probe" not in report["models"][0]["alone"]   # --quick: no probes
    for row, m in zip(res["models"], report["models"]):
        assert row["model"] == m["model"] and set(row["bar"]) == {"forget_drop_rel", "retain_points",
                                                                  "unrelated_points", "ppl_rise"}
        a, f = m["alone"], m["filter"]
        assert row["bar"]["retain_points"]["value"] == pytest.approx(100 * (f["keep"] - a["keep"]))
        assert row["bar"]["ppl_rise"]["value"] == pytest.approx(f["ppl"] / a["ppl"] - 1)
    assert report["table"] in res["table"] and "The demo's bar" in res["table"]
    # the strength each model ran at, as the recipe's report has it
    assert res["alphas"] == {m["model"]: m["alpha"] for m in report["models"]} and len(res["alphas"]) == 2


@pytest.mark.parametrize("alone, filt, passes", [
    (dict(forget=0.6, keep=0.7, general=0.65, ppl=30.0), dict(forget=0.1, keep=0.62, general=0.52, ppl=32.9),
     {"forget_drop_rel": True, "retain_points": True, "unrelated_points": True, "ppl_rise": True}),
    (dict(forget=0.6, keep=0.7, general=0.65, ppl=30.0), dict(forget=0.15, keep=0.81, general=0.49, ppl=33.0),
     {"forget_drop_rel": False, "retain_points": False, "unrelated_points": False, "ppl_rise": False}),
])
def test_demo_bar(alone, filt, passes):
    from cmc_edge.recipes.demo import check_bar

    bar = check_bar({"alone": alone, "filter": filt})
    assert {k: c["pass"] for k, c in bar.items()} == passes


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
    monkeypatch.setattr(scaffold, "template_answers", lambda path, prompts, n, side_by_side=1: [
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
    train, held = ins.split_tasks(ins.TASKS)
    # retain: each training task alone, then with an untaught instruction, then the broad prompts
    assert [r["prompt"] for r in retain] == [task for task, _ in train] + ins.retain_prompts(train)
    assert any(r["prompt"] == f"{train[0][0]} {ins.UNTAUGHT[0]}" for r in retain)
    assert not any(r["prompt"].startswith(task) for r in retain for task, _ in held)
    assert sft and all(r["prompt"] not in {x["prompt"] for x in retain} for r in sft)
    items = json.loads((run / "check_items.json").read_text())
    assert len(items) == 2 * 3                      # two held-out tasks, three prompts each
    assert res["plain_items"] == 2 * 2              # each held-out task plain and with an untaught instruction
    for m in res["models"]:
        for cond in ("base", "delta"):
            rows = m[cond]["samples"]
            assert len(rows) == len(items)
            assert m[cond]["prompt_strict"] == sum(all(v["strict"] for v in r["verdicts"]) for r in rows) / len(rows)
            plain = m[cond]["plain_samples"]
            assert [r["prompt"] for r in plain] == [t for t, _ in held] + ins.untaught_prompts(held)
            assert m[cond]["unasked"] == sum(bool(ins.unasked_formats(r["output"])) for r in plain) / len(plain)


def test_template_answers_closes_its_engine_even_when_answering_fails(monkeypatch):
    """The template's llama.cpp model is freed after its answers (and after a failure): a recipe
    that loads it again for training and checks must not hold two copies."""
    closed = []

    class Eng:
        def close(self):
            closed.append(True)

    monkeypatch.setattr(scaffold, "template_engine", lambda path, n_ctx=1024: Eng())
    monkeypatch.setattr(scaffold, "answer_all", lambda eng, prompts, **kw: [
        scaffold.Answer(p, f" {p}! ", 1, 0.0) for p in prompts])
    assert scaffold.template_answers("m.gguf", ["a", "b"], 4) == ["a!", "b!"] and closed == [True]

    def boom(eng, prompts, **kw):
        raise RuntimeError("llama.cpp failed")

    monkeypatch.setattr(scaffold, "answer_all", boom)
    with pytest.raises(RuntimeError):
        scaffold.template_answers("m.gguf", ["a"], 4)
    assert closed == [True, True]
