"""The command line: instant help, errors that name the problem and the fix, exit codes."""

import subprocess
import sys

import pytest

from cmc_edge.cli import main


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cmc_edge", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys; from cmc_edge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "serve" in r.stdout


def test_runtime_imports_no_torch():
    code = ("import sys, cmc_edge.runtime.engine, cmc_edge.runtime.sync, cmc_edge.runtime.target, "
            "cmc_edge.runtime.bundle, cmc_edge.runtime.onnx_delta, cmc_edge.tokenmap, cmc_edge.runtime.policy, "
            "cmc_edge.runtime.server; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("argv, problem", [
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "not found"),
    (["generate", "hi", "--model", "smollm2", "--delta", "/nonexistent/bundle"], "bundle"),
    (["generate", "hi", "--model", "smollm2", "--temperature", "-1", "--no-delta"], "temperature"),
    (["train", "--template", "smollm2", "--objective", "unlearn-idk", "--out", "/tmp/never"], "--forget"),
])
def test_bad_input_exits_non_zero_with_a_fix(argv, problem, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert problem in err and "Fix:" in err


def test_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert main(["generate", "hi", "--model", str(bad), "--no-delta"]) == 2
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "Fix:" in err


def test_serve_builds_its_engine_and_app_from_the_command_line(tiny_gguf, tmp_path, monkeypatch):
    """`cmc-edge serve` end to end up to uvicorn: flags -> engine with the delta -> app (uvicorn stubbed)."""
    import uvicorn

    from tiny_checkpoint import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    assert main(["serve", "--model", str(tiny_gguf), "--delta", str(bundle), "--port", "8123", "--alpha", "0.5"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert {r.path for r in seen["app"].routes} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}


@pytest.mark.parametrize("verb", [["generate", "hi"], ["chat"], ["serve"], ["eval", "--items", "x.jsonl"]])
def test_fp32_and_int8_are_one_choice(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*verb, "--delta", "b", "--fp32", "--int8"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_forget_defaults_and_help_come_from_the_recipe_config():
    """One home for the recipe's defaults: the parser and its help read ForgetConfig."""
    from cmc_edge.cli import build_parser
    from cmc_edge.recipes.forget import ForgetConfig

    d = ForgetConfig()
    p = build_parser()
    args = p.parse_args(["forget", "facts.jsonl", "--out", "x"])
    assert (args.steps, args.side_by_side, args.seed, args.template) == (d.steps, d.side_by_side, d.seed, d.template)
    sub = next(a for a in p._subparsers._group_actions[0].choices.values() if a.prog.endswith(" forget"))
    helps = {a.dest: a.help for a in sub._actions}
    assert f"default: {d.retain_l2:g};" in helps["retain_l2"]
    assert "default: " + ", ".join(f"{a:g}" for a in d.alphas) in helps["alpha"]


def test_forget_prose_retain_flag_reaches_the_recipe(monkeypatch, tmp_path):
    """Automatic unless asked for (None: tried when validation falls short); --prose-retain always,
    --no-prose-retain never, in the config the recipe runs with."""
    from cmc_edge import cli
    from cmc_edge.recipes import forget

    seen = []

    def fake_run(facts, out, cfg, overwrite=False):
        seen.append(cfg.prose_retain)
        raise SystemExit(0)

    monkeypatch.setattr(forget, "run_forget", fake_run)
    for extra in ([], ["--prose-retain"], ["--no-prose-retain"]):
        args = cli.build_parser().parse_args(["forget", "facts.jsonl", "--out", str(tmp_path / "x"), *extra])
        with pytest.raises(SystemExit):
            cli.cmd_forget(args)
    assert seen == [None, True, False]


def test_forget_alpha_per_model_flag_reaches_the_recipe(monkeypatch, tmp_path):
    from cmc_edge import cli
    from cmc_edge.recipes import forget

    seen = []

    def fake_run(facts, out, cfg, overwrite=False):
        seen.append(cfg.alpha_per_model)
        raise SystemExit(0)

    monkeypatch.setattr(forget, "run_forget", fake_run)
    for extra in ([], ["--alpha-per-model"]):
        args = cli.build_parser().parse_args(["forget", "facts.jsonl", "--out", str(tmp_path / "x"), *extra])
        with pytest.raises(SystemExit):
            cli.cmd_forget(args)
    assert seen == [False, True]
