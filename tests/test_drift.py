"""The drift check after training: held-out prose and general questions, template vs template + delta."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from cmc_edge.errors import InputError  # noqa: E402
from cmc_edge.recipes.forget_data import VALIDATION_GENERAL  # noqa: E402
from cmc_edge.train.drift import (ADVICE, DriftLimits, check_checkpoint_drift, drift_warnings,  # noqa: E402
                                  greedy_answers, measure_drift)
from cmc_edge.train.model import DeltaConfig, build_delta  # noqa: E402

QUESTIONS = [("What is the capital of France?", ("Paris",)), ("Tell me about cats.", ("cat",)),
             ("Why is the sky blue?", ("light",))]


@pytest.fixture(scope="module")
def template(tiny_gguf):
    from cmc_edge.train.template import load_template

    return load_template(tiny_gguf)


def delta_with_gate(template, value: float | None):
    """A tiny delta; ``value`` fills its final-norm weight (the gate that is zero at init)."""
    delta = build_delta(DeltaConfig.preset("tiny", template.vocab_size), seed=3)
    if value is not None:
        with torch.no_grad():
            delta.model.norm.weight.fill_(value)
    return delta


def numbers(report: dict) -> list[float]:
    return [report["ppl_change"], report["kl"], report["answers_changed"],
            *report["ppl"].values(), *report["recall"].values(), *report["refusals"].values()]


def test_untrained_delta_reports_no_drift_and_no_warning(template):
    r = measure_drift(template, delta_with_gate(template, None), 1.0)
    assert all(math.isfinite(x) for x in numbers(r))
    n = len(VALIDATION_GENERAL)
    assert r["prose_tokens"] > 100 and r["questions"] == n and len(r["answers"]) == n
    assert r["kl"] < 1e-6 and abs(r["ppl_change"]) < 1e-6
    assert r["ppl"]["template"] == pytest.approx(r["ppl"]["combined"], rel=1e-6)
    assert r["answers_changed"] == 0 and all(a["template"] == a["combined"] for a in r["answers"])
    assert r["warnings"] == []


def test_destructive_delta_warns(template):
    r = measure_drift(template, delta_with_gate(template, 30.0), 1.0, questions=QUESTIONS)
    assert r["kl"] > 0.1 and r["ppl_change"] > 0.05
    assert r["answers_changed"] > 0
    assert any(w.startswith("perplexity on held-out prose rose") for w in r["warnings"])


def test_drift_grows_with_alpha(template):
    delta = delta_with_gate(template, 30.0)
    half, full = (measure_drift(template, delta, a, questions=QUESTIONS[:1]) for a in (0.5, 1.0))
    assert 0 < half["kl"] < full["kl"]


def test_batched_answers_match_one_at_a_time(template):
    """Left padding must not change an answer: the delta reads the padded batch with its own mask
    and positions."""
    delta = delta_with_gate(template, 30.0).eval()
    qs = [q for q, _ in QUESTIONS]
    batched = greedy_answers(template, delta, 1.0, qs, max_new_tokens=8)
    alone = [greedy_answers(template, delta, 1.0, [q], max_new_tokens=8)[0] for q in qs]
    assert batched == alone
    assert batched != greedy_answers(template, None, 1.0, qs, max_new_tokens=8)   # the delta did act


def report(ppl=0.0, recall=(0.9, 0.9), refusals=(0.0, 0.0)):
    return {"ppl": {"template": 20.0, "combined": 20.0 * (1 + ppl)}, "ppl_change": ppl,
            "recall": dict(zip(("template", "combined"), recall)),
            "refusals": dict(zip(("template", "combined"), refusals))}


@pytest.mark.parametrize("rep, warned", [
    (report(), []),
    (report(ppl=0.049), []),
    (report(ppl=0.05), ["perplexity"]),
    (report(ppl=-0.2), []),
    (report(ppl=float("nan")), ["perplexity"]),
    (report(recall=(0.9, 0.8)), []),
    (report(recall=(0.9, 0.7)), ["general-question recall"]),
    (report(recall=(0.5, 0.9)), []),
    (report(refusals=(0.1, 0.3)), []),
    (report(refusals=(0.1, 0.5)), ["refusals"]),
    (report(ppl=59.0, recall=(0.9, 0.0), refusals=(0.0, 1.0)), ["perplexity", "general-question recall", "refusals"]),
])
def test_warnings_follow_the_limits(rep, warned):
    got = drift_warnings(rep, DriftLimits())
    assert [w.split(" ")[0] for w in got] == [w.split(" ")[0] for w in warned]
    assert all(w.startswith(p) for w, p in zip(got, warned))


@pytest.fixture(scope="module")
def checkpoint(template, tmp_path_factory):
    from cmc_edge.train.data import encode_records
    from cmc_edge.train.loop import TrainConfig, train

    def recs(pairs):
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs]

    data = {"forget": encode_records(recs([("What is the capital of Peru?", "I do not know.")]), template.tokenizer,
                                     template.prompt_format, "forget", 128),
            "retain": encode_records(recs([("Tell me about tea.", "Tea is a drink.")]), template.tokenizer,
                                     template.prompt_format, "retain", 128)}
    cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=2, batch_size=2)
    return train(template, data, cfg, tmp_path_factory.mktemp("drift") / "ckpt", progress=False)


def destroy(ckpt, tmp_path):
    """A copy of ``ckpt`` whose delta gate is scaled up a lot."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = shutil.copytree(ckpt, tmp_path / "destroyed")
    w = load_file(out / "model.safetensors")
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], 30.0)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_checkpoint_check_writes_drift_json(template, checkpoint, tmp_path, caplog):
    bad = destroy(checkpoint, tmp_path)
    with caplog.at_level("WARNING", logger="cmc_edge.train.drift"):
        r = check_checkpoint_drift(template, bad)
    saved = json.loads((bad / "drift.json").read_text())
    assert saved["warnings"] == r["warnings"] and r["warnings"]
    assert saved["kl"] == pytest.approx(r["kl"]) and saved["alpha"] == 1.0
    logged = [rec.getMessage() for rec in caplog.records]
    assert r["warnings"][0] in logged and ADVICE in logged


def test_checkpoint_of_another_template_is_refused(template, checkpoint, tmp_path):
    import shutil

    other = shutil.copytree(checkpoint, tmp_path / "other")
    meta = json.loads((other / "cmc.json").read_text())
    meta["template"]["vocab_hash"] = "0" * 64
    (other / "cmc.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="another template"):
        check_checkpoint_drift(template, other)


def test_cli_prints_the_table_and_loud_warnings(template, checkpoint, tmp_path, capsys):
    from cmc_edge.cli import _drift_check

    _drift_check(template, checkpoint)
    out, err = capsys.readouterr()
    assert "drift check at alpha 1" in out and "perplexity (prose)" in out
    assert (checkpoint / "drift.json").is_file()
    _drift_check(template, destroy(checkpoint, tmp_path))
    out, err = capsys.readouterr()
    assert "DAMAGES UNRELATED TEXT" in out
    lines = err.splitlines()
    assert any(line.startswith("WARNING: perplexity on held-out prose rose") for line in lines)
    assert f"WARNING: {ADVICE}" in lines


def test_cli_train_unlearn_checks_drift_unless_told_not_to(tiny_gguf, tmp_path, capsys):
    from cmc_edge.cli import main

    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text(json.dumps({"prompt": "What is the capital of Peru?", "response": "I do not know."}) + "\n")
    retain.write_text(json.dumps({"prompt": "Tell me about tea.", "response": "Tea is a drink."}) + "\n")
    argv = ["train", "--template", str(tiny_gguf), "--objective", "unlearn-idk", "--forget", str(forget),
            "--retain", str(retain), "--size", "tiny", "--steps", "2", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "drift check" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "a" / "drift.json").read_text())) >= {"ppl", "kl", "recall", "refusals",
                                                                             "warnings", "answers"}
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-drift-check"]) == 0
    assert "drift check" not in capsys.readouterr().out and not (tmp_path / "b" / "drift.json").exists()
