"""What would validation choose if it ran another LLM? The recipe's own validation
(:func:`cmc_edge.recipes.forget.validate_models`) on a finished
`cmc-edge forget` run's bundle, decoded on MODEL; no training.

    python bench/forget_valcheck.py gemma3 runs/forget-bar-13/companies runs/forget-bar-13/people
"""
import json
import sys
from pathlib import Path

from cmc_edge.recipes import forget as fr
from cmc_edge.recipes.facts import read_facts

model = sys.argv[1]
out = {}
for d in map(Path, sys.argv[2:]):
    facts = read_facts(d / "facts.jsonl")
    # One model: validated as the template is, at every strength, for a choice of its own.
    v = fr.validate_models(d / "bundle", [model], facts, fr.ForgetConfig())[model]
    measured, choice = v["measured"], (v["alpha"], v["status"], v["reasons"])
    out[d.name] = {"measured": measured, "choice": choice}
    print(d.name, model, choice, {a: {k: round(m[k], 3) for k in ("forget", "keep", "kin", "general", "ppl") if k in m}
                                  for a, m in measured.items()}, flush=True)
Path(f"valcheck-{model}.json").write_text(json.dumps(out, indent=1, default=float))
