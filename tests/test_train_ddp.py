"""`train` under torchrun: 2 CPU processes (gloo) stay in sync while drawing different batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = r"""
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[3])
import cmc_edge.train.loop as loop
from cmc_edge.train.data import encode_records
from cmc_edge.train.template import load_template

seen = {}
_head = loop._head
loop._head = lambda delta: seen.setdefault("delta", delta) and _head(delta)
tpl = load_template(sys.argv[1])
recs = lambda pairs: [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs]
data = {"sft": encode_records(recs([(f"Tell me about {c}.", f"{c} is nice.") for c in ("cats", "rain", "tea", "snow")]),
                              tpl.tokenizer, tpl.prompt_format, "sft", 128)}
losses = []
cfg = loop.TrainConfig(objective="sft", size="tiny", steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=0)
loop.train(tpl, data, cfg, sys.argv[2] + "/ckpt", progress=False, on_step=lambda s, r: losses.append(r["loss"]))
h = hashlib.sha256()
for k, v in sorted(seen["delta"].state_dict().items()):
    h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
rank = os.environ["RANK"]
open(f"{sys.argv[2]}/rank{rank}.json", "w").write(json.dumps({"hash": h.hexdigest(), "losses": losses}))
"""


def test_two_processes_stay_in_sync(tiny_gguf, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env_path = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_gguf), str(tmp_path), env_path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["hash"] == r1["hash"]                 # same weights after 6 steps ...
    assert r0["losses"] != r1["losses"]             # ... although each rank trained on its own batches
    meta = json.loads((tmp_path / "ckpt" / "cmc.json").read_text())
    assert meta["world_size"] == 2 and meta["train_config"]["grad_accum"] == 2
    assert len(json.loads((tmp_path / "ckpt" / "loss_log.json").read_text())) == 6
