"""What would validation choose if it ran another LLM? The recipe's validation split and rule
(`choose_alpha`) on a finished `cmc-edge forget` run's bundle, decoded on MODEL; no training.

    python bench/forget_valcheck.py gemma3 runs/forget-bar-13/companies runs/forget-bar-13/people
"""
import json, sys
from pathlib import Path
from cmc_edge.recipes import forget as fr
from cmc_edge.recipes import forget_data as fd
from cmc_edge.recipes.facts import read_facts
from cmc_edge.recipes.scaffold import answer_at
from cmc_edge.runtime.engine import Delta, Engine
from cmc_edge.runtime.target import TargetLLM
from cmc_edge.models import resolve_model
from cmc_edge.eval.runner import perplexity
from cmc_edge.eval.demo_data import GENERAL_TEXT

model = sys.argv[1]
out = {}
for d in map(Path, sys.argv[2:]):
    facts = read_facts(d / "facts.jsonl")
    t = TargetLLM(resolve_model(model), n_ctx=1024, n_threads=2)
    e = Engine(t, [Delta(d / "bundle", t)])
    vitems = fr.validation_items(facts)
    strengths = (0.0, 0.5, 0.75, 1.0)
    every = answer_at(e, [it["prompt"] for it in vitems], [[a] for a in strengths], max_tokens=24, side_by_side=8, desc="val")
    measured = {}
    for a, got in zip(strengths, every):
        rows = fr.score(vitems, got)
        measured[a] = fr.summarize([r for r in rows if r["split"] != "broad"])
        measured[a]["ppl"] = perplexity(e, "\n\n".join(fd.VALIDATION_PROSE), alphas=[a])
    e.close()
    choice = fr.choose_alpha(measured)
    out[d.name] = {"measured": measured, "choice": choice}
    print(d.name, model, choice, {a: {k: round(m[k], 3) for k in ("forget", "keep", "kin", "general", "ppl") if k in m} for a, m in measured.items()}, flush=True)
Path(f"valcheck-{model}.json").write_text(json.dumps(out, indent=1, default=float))
