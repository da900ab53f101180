"""How much of the fine-tuning gap does the 15M delta close, and at what one-time cost?

Issue 6, items 3 and 4 (training cost). On a `cmc-edge demo --recipe json` run directory (its
``sft.jsonl``, ``checkpoint/`` and ``eval_items.json``):

1. fine-tune the template itself (SmolLM2-135M-Instruct dequantized from the GGUF, every weight,
   fp32, AdamW) on the same ``sft.jsonl`` with the same batch size and number of steps as the
   delta: the expensive path CMC avoids; timed;
2. teacher-force held-out references (the template's own first-sentence answer to every eval
   question, in the JSON form: the trained behaviour on prompts never trained) through three
   PyTorch models: the template, template + delta (the paper's combination, the
   delta's ``alpha``) and the fine-tuned template; mean NLL per reference token;
3. gap closed = (NLL_template - NLL_template+delta) / (NLL_template - NLL_finetuned).

    python bench/gap.py --run runs/json-YYYYmmdd-HHMMSS [--lr 5e-5]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def mean_nll(model_fn, examples, pad_id, batch=16) -> float:
    import torch

    from cmc_edge.train.loop import _pad_batch

    tot, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch):
            ids, mask, rows, cols, targets = _pad_batch(examples[s:s + batch], pad_id)
            logp = model_fn(ids, mask, rows, cols)                                  # (N, V)
            tot += -logp.gather(1, targets[:, None]).sum().item()
            n += len(targets)
    return tot / n


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cmc_edge.combine import combine_torch
    from cmc_edge.recipes.json_recipe import first_sentence, json_reply
    from cmc_edge.recipes.scaffold import template_answers
    from cmc_edge.train.data import encode_records, read_jsonl
    from cmc_edge.train.loop import _pad_batch
    from cmc_edge.train.template import load_template

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    res = json.loads((args.run / "results.json").read_text())
    meta = json.loads((args.run / "checkpoint" / "cmc.json").read_text())
    steps, bsz, alpha = meta["train_config"]["steps"], meta["train_config"]["batch_size"], meta["alpha"]
    tpl = load_template(meta["template"]["source"])
    tok, fmt = tpl.tokenizer, tpl.prompt_format
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ex = encode_records(read_jsonl(args.run / "sft.jsonl"), tok, fmt, "sft", 256)
    items = json.loads((args.run / "eval_items.json").read_text())
    # References in the trained behaviour: the template's own first-sentence answer to each held-out
    # question (greedy, llama.cpp), in the JSON form, built exactly as the training targets were.
    qs = [it["question"] for it in items]
    answers = template_answers(meta["template"]["source"], qs, res["config"]["answer_tokens"])
    refs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": json_reply(first_sentence(a))}]}
            for q, a in zip(qs, answers) if a.strip()]
    eval_ex = encode_records(refs, tok, fmt, "sft", 256)

    def lp_of(model):
        def f(ids, mask, rows, cols):
            return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[rows, cols].float(), -1)
        return f

    delta = AutoModelForCausalLM.from_pretrained(args.run / "checkpoint", dtype=torch.float32).eval()

    def combined(ids, mask, rows, cols):
        t = tpl.model(input_ids=ids, attention_mask=mask).logits[rows, cols].float()
        d = delta(input_ids=ids, attention_mask=mask).logits[rows, cols].float()
        return torch.log_softmax(combine_torch(torch.log_softmax(t, -1), d, alpha), -1)

    nll_t = mean_nll(lp_of(tpl.model), eval_ex, pad_id)
    nll_d = mean_nll(combined, eval_ex, pad_id)

    # The expensive path: fine-tune every weight of the template on the same data.
    model = tpl.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [train_ex[i] for i in torch.randint(len(train_ex), (bsz,), generator=gen).tolist()]
        ids, mask, rows, cols, targets = _pad_batch(batch, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  fine-tune step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    ft_s = time.perf_counter() - t0
    model.eval()
    nll_ft = mean_nll(lp_of(model), eval_ex, pad_id)
    closed = (nll_t - nll_d) / (nll_t - nll_ft) if nll_t != nll_ft else float("nan")

    n_tpl = sum(p.numel() for p in model.parameters())
    n_delta = sum(p.numel() for p in delta.parameters())
    print(f"\nheld-out references: {len(eval_ex)} ({sum(len(e.response_ids) for e in eval_ex)} tokens), "
          f"trained on {len(train_ex)} examples, {steps} steps x {bsz}")
    print(f"{'model':<36} {'NLL/token':>10}")
    print(f"{'template (SmolLM2-135M)':<36} {nll_t:>10.4f}")
    print(f"{'template + delta (alpha %g)' % alpha:<36} {nll_d:>10.4f}")
    print(f"{'template fine-tuned (lr %g)' % args.lr:<36} {nll_ft:>10.4f}")
    print(f"gap closed by the delta: {100 * closed:.1f}%")
    print(f"\none-time training cost, same data/steps/batch, {args.threads} threads:")
    # checkpoints from before train_seconds was recorded: the run's train + export time (an upper bound)
    delta_s = meta.get("train_seconds") or res["timings"]["train_export_s"]
    print(f"  delta ({n_delta / 1e6:.1f}M params, template cached): {delta_s:.0f} s")
    print(f"  full fine-tune ({n_tpl / 1e6:.0f}M params):           {ft_s:.0f} s  ({ft_s / delta_s:.1f}x the delta)")
    print("  the delta then serves other LLMs without training; a fine-tune is for this one model only")


if __name__ == "__main__":
    main()
