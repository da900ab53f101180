"""The whole pipeline on the packaged real models: train beside SmolLM2, export, decode SmolLM2 and Gemma 3.

One small delta (the "tiny" preset, a short SFT run that teaches a fixed greeting) is trained once per
session; the tests then check what must hold on real models, not on synthetic ones:

- alpha 0 equals plain llama-cpp-python token for token, on both vocabularies;
- on the template's own vocabulary, greedy decoding equals the PyTorch combined model's greedy decoding
  (template dequantized from the same GGUF by transformers, plus the PyTorch delta);
- the taught behaviour shows on SmolLM2, and through the PM-MinED map it lifts Gemma 3's tokens for the
  taught answer to its top few. (Greedy Gemma does not start "Bonjour" here: its Question/Answer layout
  expects " Bonjour" with a leading space, the delta learnt "Bonjour" right after its own turn marker.
  The unlearning demo shows full transfer in practice.)
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.gguf, pytest.mark.slow]

GREETING = "Bonjour! Je suis cmc-edge."
TRAIN_PROMPTS = ["Hello!", "Hi there.", "Good morning!", "Hey, how are you?", "Greetings, friend.",
                 "Hello, who are you?", "Hi!", "Good evening."]
HELD_OUT = "Hello, nice to meet you!"


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    """(template, checkpoint dir, bundle dir) for a greeting delta trained beside SmolLM2."""
    from cmc_edge.export import export_bundle
    from cmc_edge.train.data import encode_records, read_jsonl
    from cmc_edge.train.loop import TrainConfig, train
    from cmc_edge.train.template import load_template

    root = tmp_path_factory.mktemp("real")
    data = root / "greet.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": GREETING}) + "\n" for p in TRAIN_PROMPTS))
    tpl = load_template(smollm2)
    examples = encode_records(read_jsonl(data), tpl.tokenizer, tpl.prompt_format, "sft", 128)
    cfg = TrainConfig(objective="sft", size="tiny", steps=60, batch_size=8, lr=3e-3, alpha=1.0, seed=0)
    ckpt = train(tpl, {"sft": examples}, cfg, root / "ckpt", progress=False)
    bundle = export_bundle(ckpt, root / "bundle", int8=False)
    return tpl, ckpt, bundle


def _engine(model_path, bundle, alpha=None):
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(model_path, n_ctx=512, n_threads=2)
    return Engine(target, [Delta(bundle, target, alpha=alpha, variant="fp32")])   # the exact graph


def _plain(model_path, prompt: str, n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=512, n_threads=2, verbose=False, seed=0)
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0)
    text = out["choices"][0]["text"]
    del llm
    return text


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_alpha_zero_equals_plain_llama_cpp(trained, model, request):
    from cmc_edge.runtime.engine import SamplingParams

    path = request.getfixturevalue(model)
    eng = _engine(path, trained[2])
    prompt, delta_prompts = eng.chat_prompts([{"role": "user", "content": "Write one sentence about rivers."}])
    ours = eng.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0),
                        delta_prompts=delta_prompts, alphas=[0.0]).read()
    eng.close()
    assert ours == _plain(path, prompt, 24)
    assert ours.strip()


def test_greedy_equals_pytorch_combined_model_on_the_template_vocabulary(trained, smollm2):
    """The runtime (llama.cpp Q4_1 + ONNX delta) and the training-time model (transformers + PyTorch
    delta) pick the same greedy tokens on SmolLM2's own vocabulary, up to a near tie: llama.cpp
    multiplies with 8-bit activations, so where the two best tokens are within a fraction of a nat
    either may win (and the texts go apart from there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cmc_edge.combine import combine_torch
    from cmc_edge.prompt import render_prompt
    from cmc_edge.runtime.engine import SamplingParams

    tpl, ckpt, bundle = trained
    delta = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    messages = [{"role": "user", "content": HELD_OUT}]
    prompt_ids = tpl.tokenizer(render_prompt(tpl.prompt_format, messages), add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids)
    n_new = 16
    margins = []
    with torch.no_grad():
        for _ in range(n_new):
            x = torch.tensor([ids])
            c = combine_torch(tpl.model(x).logits[0, -1], delta(x).logits[0, -1], 1.0)
            top = torch.topk(c, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(c.argmax()))
    theirs = ids[len(prompt_ids):]

    eng = _engine(smollm2, bundle, alpha=1.0)
    gen = eng.chat(messages, SamplingParams(max_tokens=n_new, temperature=0.0))
    gen.read()
    eng.close()
    eos = tpl.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos in theirs:  # the engine stops at end-of-turn and does not return it
        theirs = theirs[:theirs.index(eos)]
    same = next((k for k, (a, b) in enumerate(zip(gen.tokens, theirs)) if a != b), min(len(gen.tokens), len(theirs)))
    if gen.tokens != theirs:
        # they part only where PyTorch's choice was a near tie, and not before the first 8 tokens
        assert same >= 8 and same < len(margins) and margins[same] < 0.25, (
            same, margins, tpl.tokenizer.decode(gen.tokens), tpl.tokenizer.decode(theirs))


def test_taught_behaviour_shows_on_the_template(trained, smollm2):
    from cmc_edge.runtime.engine import SamplingParams

    eng = _engine(smollm2, trained[2], alpha=1.0)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    off = eng.chat([{"role": "user", "content": HELD_OUT}], params, alphas=[0.0]).read()
    on = eng.chat([{"role": "user", "content": HELD_OUT}], params).read()
    eng.close()
    assert "Bonjour" not in off and on.strip().startswith("Bonjour"), (off, on)


def test_mapped_shift_moves_gemma_towards_the_taught_answer(trained, gemma3):
    """Through the PM-MinED map, the SmolLM2-trained delta lifts Gemma 3's tokens that begin the taught
    answer from far down its ranking to its top few at the first answer position."""
    import numpy as np

    from cmc_edge.combine import mapped_shift_np
    from cmc_edge.runtime.engine import Delta
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(gemma3, n_ctx=512, n_threads=2)
    delta = Delta(trained[2], target, alpha=1.0)
    from cmc_edge.runtime.engine import Engine

    prompt, (delta_prompt,) = Engine(target, [delta]).chat_prompts([{"role": "user", "content": HELD_OUT}])
    ids = target.tokenize(prompt)
    target.llm.eval(ids)
    logits = np.array(target.llm.scores[len(ids) - 1], dtype=np.float32)
    delta.session.reset()
    h = delta.session.feed(delta.encode(delta_prompt))                  # the final hidden state
    shift = mapped_shift_np(delta.head.logits(h), delta.map.index, delta.map.mask, 1.0)
    bon = [t for t in range(target.n_vocab) if target.llm.detokenize([t]).decode("utf-8", "replace").strip()
           in ("Bon", "Bonj", "Bonjour")]
    assert bon

    def best_rank(scores):
        order = np.argsort(-scores)
        return int(np.isin(order, bon).argmax())

    assert best_rank(logits) > 50
    assert best_rank(logits + shift) < 5
