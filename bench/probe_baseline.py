"""Baseline knowledge of the demo models, before any filter: what does each one recall?

Asks every capital question (train and held-out forms), every other-attribute question and every
unrelated question of ``cmc_edge.eval.demo_data`` to SmolLM2-135M-Instruct (its own chat template)
and Gemma 3 270M base (no chat template: several fallback formats are compared on a subset, the
best one is run on everything). Prints recall per model and question group, the countries each
model knows (capital recalled on a majority of forms) and the unrelated questions neither knows.

    .venv/bin/python bench/probe_baseline.py [--json results.json] [--countries 10]

Decoding: llama-cpp-python, n_ctx 512, 2 threads, greedy, at most 24 new tokens, seed 0.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from cmc_edge.eval import demo_data as dd
from cmc_edge.eval.scoring import answer_recalled, recall

MAX_TOKENS = 24


@dataclass(frozen=True)
class Format:
    name: str
    render: Callable[[str], str]
    stop: tuple[str, ...]


def load_llama(path):
    """A Llama with weight repacking off.

    On this machine's CPU (AMX advertised by CPUID, but ``ldtilecfg`` faults in the VM) llama.cpp's
    AMX extra buffer type segfaults on any batch of more than one token. ``use_extra_bufts`` is not
    a ``Llama`` argument in 0.3.36, so the default model params are patched while loading.
    """
    import llama_cpp
    from llama_cpp import Llama

    orig = llama_cpp.llama_cpp.llama_model_default_params

    def no_extra_bufts():
        params = orig()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    try:
        return Llama(str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = orig


def chat_template_format(llm, name: str) -> Format:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(llm.metadata["tokenizer.chat_template"])

    def render(q: str) -> str:
        return template.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True,
                               bos_token="", eos_token="")

    return Format(name, render, ("<|im_end|>", "\n\n"))


GEMMA_FORMATS = (
    Format("gemma-turns", lambda q: f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n",
           ("<end_of_turn>", "\n\n")),
    Format("question-answer", lambda q: f"Question: {q}\nAnswer:", ("\n",)),
    Format("user-assistant", lambda q: f"User: {q}\nAssistant:", ("\nUser:", "\n\n")),
)


def probe_items(countries: list[str]) -> list[dict]:
    items = dd.capital_items(countries, dd.TRAIN_CAPITAL_FORMS, "retain", group="capital/train")
    items += dd.capital_items(countries, dd.HELDOUT_CAPITAL_FORMS, "retain", group="capital/heldout")
    items += dd.attribute_items(countries, dd.TRAIN_ATTRIBUTE_FORMS, group="attr/train")
    items += dd.attribute_items(countries, dd.HELDOUT_ATTRIBUTE_FORMS, group="attr/heldout")
    items += [{**it, "group": "general"} for it in dd.unrelated_items()]
    return items


def shared_prefix_len(llm, fmt: Format) -> int:
    """Tokens that every prompt of ``fmt`` starts with, less one for a token merging at the seam."""
    a, b = (llm.tokenize(fmt.render(q).encode("utf-8"), special=True) for q in ("Why?", "42 + 1 ="))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return max(n - 1, 0)


def run(llm, fmt: Format, items: list[dict], cache: dict) -> list[dict]:
    """Answer every item (reusing ``cache`` keyed by question) and score it.

    llama.cpp reuses the longest prefix shared with the previous prompt, and the batch split that
    follows can flip a borderline greedy answer, so answers would depend on the order of questions.
    Here every prompt reuses exactly the format's shared prefix, computed once from a fixed
    warm-up prompt: each answer depends only on its own question.
    """
    keep = shared_prefix_len(llm, fmt)
    llm.reset()
    llm.create_completion(fmt.render("Hello?"), max_tokens=1, temperature=0.0)
    out = []
    for it in items:
        q = it["question"]
        if q not in cache:
            llm.n_tokens = min(llm.n_tokens, keep)
            res = llm.create_completion(fmt.render(q), max_tokens=MAX_TOKENS, temperature=0.0,
                                        stop=list(fmt.stop), seed=0)
            cache[q] = res["choices"][0]["text"]
        out.append({**it, "output": cache[q], "correct": answer_recalled(cache[q], it["answers"])})
    return out


def group_key(r: dict) -> str:
    return f"{r['group']}:{r['attribute']}" if r["kind"] == "attribute" else r["group"]


def summary(results: list[dict]) -> dict[str, tuple[float, int]]:
    by = defaultdict(list)
    for r in results:
        by[group_key(r)].append(r)
    return {k: (recall(v), len(v)) for k, v in sorted(by.items())}


def main(argv=None) -> None:
    from cmc_edge.models import gemma3_path, smollm2_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every answer here")
    ap.add_argument("--countries", type=int, default=None, help="probe only the first N countries (smoke run)")
    args = ap.parse_args(argv)

    countries = [c.name for c in dd.COUNTRIES][: args.countries]
    items = probe_items(countries)
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    formats: dict[str, str] = {}

    llm = load_llama(smollm2_path())
    fmt = chat_template_format(llm, "smollm2-chat-template")
    results["smollm2"], formats["smollm2"] = run(llm, fmt, items, {}), fmt.name
    print(f"smollm2: {len(items)} prompts, {time.time() - t0:.0f}s elapsed", flush=True)
    del llm

    # Gemma: compare fallback formats on the first train capital form for every other country plus
    # the general questions, then run the winner on everything (its subset answers are reused).
    llm = load_llama(gemma3_path())
    sample = set(countries[::2])
    subset = [it for it in items if it["group"] == "general"
              or (it.get("form") == dd.TRAIN_CAPITAL_FORMS[0] and it["country"] in sample)]
    compare, caches = {}, {}
    for fmt in GEMMA_FORMATS:
        caches[fmt.name] = {}
        res = run(llm, fmt, subset, caches[fmt.name])
        cap = recall([r for r in res if r["kind"] == "capital"])
        gen = recall([r for r in res if r["kind"] == "general"])
        compare[fmt.name] = (cap, gen)
        print(f"gemma3 format {fmt.name:16s} capital {cap:.3f}  general {gen:.3f}  "
              f"({len(subset)} prompts, {time.time() - t0:.0f}s elapsed)", flush=True)
    best = max(GEMMA_FORMATS, key=lambda f: sum(compare[f.name]))
    results["gemma3"], formats["gemma3"] = run(llm, best, items, caches[best.name]), best.name
    print(f"gemma3: best format {best.name}; {len(items)} prompts, {time.time() - t0:.0f}s elapsed\n")
    del llm

    tables = {m: summary(r) for m, r in results.items()}
    print(f"{'group':28s}" + "".join(f"{m + ' (' + formats[m] + ')':>34s}" for m in results))
    for key in tables["smollm2"]:
        cells = "".join(f"{f'{tables[m][key][0]:.3f} (n={tables[m][key][1]})':>34s}" for m in results)
        print(f"{key:28s}{cells}")

    known = {m: dd.known_countries(r) for m, r in results.items()}
    for m, names in known.items():
        print(f"\n{m} knows {len(names)}/{len(countries)} capitals: {names}")
    both = sorted(set(known["smollm2"]) & set(known["gemma3"]))
    print(f"\nboth know {len(both)}: {both}")

    general = defaultdict(dict)
    for m, rs in results.items():
        for r in rs:
            if r["kind"] == "general":
                general[r["question"]][m] = r["correct"]
    neither = [q for q, ok in general.items() if not any(ok.values())]
    print(f"\ngeneral questions neither model answered ({len(neither)}): {neither}")
    print(f"\ntotal {time.time() - t0:.0f}s")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"formats": formats, "gemma_format_comparison": compare, "results": results}, fh,
                      indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
