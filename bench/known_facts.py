"""Which candidate facts do the models know alone? How the held-out animals set was picked.

    python bench/known_facts.py CANDIDATES.jsonl OUT.jsonl

Each candidate ({"question", "answer", "aliases"}) is asked of SmolLM2 and Gemma 3 alone (no
filter) in three wrappers that no split of the forget recipe uses ("{q}" aside), greedy, 24 tokens.
A candidate is kept when one of the two models gives its answer in at least two of the three and
its question does not contain its answer; the kept ones are then marked by position, two "forget" to one "keep" (i % 3 < 2). Prints each answer.
Nothing is trained; only the models' own knowledge decides.
"""

from __future__ import annotations

import json
import sys

from cmc_edge.eval.scoring import answer_recalled
from cmc_edge.models import resolve_model
from cmc_edge.recipes.scaffold import answer_all
from cmc_edge.runtime.engine import Engine
from cmc_edge.runtime.target import TargetLLM

WRAPPERS = ("{q}", "Question for you: {q}", "{q} Answer in a few words.")


def main(src: str, dst: str) -> int:
    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    known: dict[str, dict[str, int]] = {}
    for name in ("smollm2", "gemma3"):
        eng = Engine(TargetLLM(resolve_model(name), n_ctx=1024, n_threads=2))
        answers = answer_all(eng, [w.replace("{q}", r["question"]) for r in rows for w in WRAPPERS],
                             max_tokens=24, side_by_side=8)
        for i, r in enumerate(rows):
            got = answers[len(WRAPPERS) * i:len(WRAPPERS) * (i + 1)]
            known.setdefault(r["question"], {})[name] = sum(
                answer_recalled(a.text, [r["answer"], *r.get("aliases", [])]) for a in got)
            print(name, known[r["question"]][name], r["question"], "|", got[0].text[:60].replace("\n", " "))
        eng.close()
    # Known, and not a question that says its own answer ("What animal is Mickey Mouse?": every echo would leak).
    chosen = [r for r in rows if max(known[r["question"]].values()) >= 2
              and not answer_recalled(r["question"], [r["answer"], *r.get("aliases", [])])]
    out = [{**r, "split": "forget" if i % 3 < 2 else "keep"} for i, r in enumerate(chosen)]
    with open(dst, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} known, {sum(r['split'] == 'forget' for r in out)} to forget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
