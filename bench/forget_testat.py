"""The test-split check of a finished `cmc-edge forget` run's bundle on MODEL at another alpha (reporting only:
never a way to choose the strength).

    python bench/forget_testat.py gemma3 runs/forget-bar-13/companies@0.75
"""
import json, sys
from pathlib import Path
from cmc_edge.recipes import forget as fr
from cmc_edge.recipes.facts import read_facts
from cmc_edge.eval.demo_data import GENERAL_TEXT

model = sys.argv[1]
res = {}
for arg in sys.argv[2:]:
    d, a = arg.split("@")
    d, a = Path(d), float(a)
    rep = json.loads((d / "report.json").read_text())
    facts = read_facts(d / "facts.jsonl")
    items = fr.test_items(facts, rep["training_data"]["lead_ins"], True)
    out, _ = fr.check_model(model, d / "bundle", items, a, facts, fr.ForgetConfig(), "\n\n".join(GENERAL_TEXT))
    al, fi = out["alone"], out["filter"]
    res[f"{d.name}@{a:g}"] = out
    print(d.name, model, a, "forget %.1f->%.1f" % (100 * al["forget"], 100 * fi["forget"]),
          "probe %.1f->%.1f" % (100 * al["probe"], 100 * fi["probe"]), "keep %+.1f" % (100 * (fi["keep"] - al["keep"])),
          "general %+.1f" % (100 * (fi["general"] - al["general"])), "ppl %+.2f%%" % (100 * (fi["ppl"] / al["ppl"] - 1)),
          {k: c["pass"] for k, c in out["bar"].items()}, flush=True)
Path(f"testat-{model}.json").write_text(json.dumps(res, indent=1, default=float))
