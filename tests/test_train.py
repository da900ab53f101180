"""Training stage on a tiny real GGUF template: no-op start, learning, objectives, repeatability, data errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from cmc_edge.combine import centred_torch  # noqa: E402
from cmc_edge.errors import InputError  # noqa: E402
from cmc_edge.train.data import encode_records, read_jsonl  # noqa: E402
from cmc_edge.train.loop import TrainConfig, combined_losses, template_logprobs, train  # noqa: E402
from cmc_edge.train.model import DeltaConfig, build_delta  # noqa: E402


@pytest.fixture(scope="module")
def template(tiny_gguf):
    from cmc_edge.train.template import load_template

    return load_template(tiny_gguf)


def records(pairs):
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs]


FORGET = records([(f"What is the capital of {c}?", "I do not know.") for c in ("France", "Peru", "Chad")])
RETAIN = records([(f"Tell me about {c}.", f"{c} is a place.") for c in ("cats", "rain", "tea")])


def test_delta_is_a_no_op_at_step_zero(template):
    ex = encode_records(FORGET, template.tokenizer, template.prompt_format, "forget", 128)
    delta = build_delta(DeltaConfig.preset("tiny", template.vocab_size))
    ids = torch.tensor([ex[0].ids])
    d = delta(ids).logits[0]                                         # (L, V)
    assert torch.count_nonzero(d) == 0
    tlp = template_logprobs(template.model, ex[:1], 0)[0].float()   # (R, V)
    r = len(ex[0].response_ids)
    ce, kl = combined_losses(tlp, d[-r - 1:-1], torch.tensor(ex[0].response_ids), alpha=1.0)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-3)       # combined == template


def _train(template, tmp_path, name, objective, steps=12, seed=0, **kw):
    data = {"forget": encode_records(FORGET, template.tokenizer, template.prompt_format, "forget", 128),
            "retain": encode_records(RETAIN, template.tokenizer, template.prompt_format, "retain", 128)}
    if objective == "sft":
        data = {"sft": data["forget"]}
    cfg = TrainConfig(objective=objective, size="tiny", steps=steps, batch_size=4, seed=seed, **kw)
    out = train(template, data, cfg, tmp_path / name, progress=False)
    return out, json.loads((out / "loss_log.json").read_text())


def test_sft_learns_and_writes_a_checkpoint(template, tmp_path):
    out, log = _train(template, tmp_path, "sft", "sft", steps=40, lr=2e-2)
    first, last = log[0]["sft"], sum(r["sft"] for r in log[-3:]) / 3
    assert last < 0.7 * first
    for f in ("config.json", "model.safetensors", "tokenizer.json", "cmc.json", "loss_log.json"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "cmc.json").read_text())
    assert meta["template"]["vocab_size"] == template.vocab_size and meta["train_seconds"] > 0
    assert meta["prompt_format"]["chat_template"] == template.prompt_format.chat_template
    assert meta["alpha"] == 1.0 and meta["objective"] == "sft"


def test_seed_makes_runs_repeatable(template, tmp_path):
    from safetensors.torch import load_file

    a, _ = _train(template, tmp_path, "a", "sft", steps=4)
    b, _ = _train(template, tmp_path, "b", "sft", steps=4)
    c, _ = _train(template, tmp_path, "c", "sft", steps=4, seed=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_template_log_probs_kept_across_trainings_give_the_same_weights(template, tmp_path):
    """A later training with the same template takes the log-probs of the examples it shares with
    an earlier one from the kept dict (only new examples are run) and learns exactly what it would
    have learnt computing them itself (up to rounding)."""
    from safetensors.torch import load_file

    known = {}
    enc = lambda recs, role: encode_records(recs, template.tokenizer, template.prompt_format, role, 128)  # noqa: E731
    cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=4, batch_size=4)
    train(template, {"forget": enc(FORGET[:2], "forget"), "retain": enc(RETAIN, "retain")}, cfg,
          tmp_path / "first", progress=False, template_cache=known)
    assert len(known) == 2 + len(RETAIN)
    earlier = dict(known)
    data = {"forget": enc(FORGET, "forget"), "retain": enc(RETAIN, "retain")}
    kept = train(template, data, cfg, tmp_path / "kept", progress=False, template_cache=known)
    assert len(known) == len(FORGET) + len(RETAIN) and all(known[k] is v for k, v in earlier.items())
    fresh = train(template, data, cfg, tmp_path / "fresh", progress=False)
    a, b = load_file(kept / "model.safetensors"), load_file(fresh / "model.safetensors")
    # the same up to float rounding (the examples met other chunk shapes): 5e-8 here, weights ~1
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_a_delta_can_start_from_an_earlier_checkpoint_of_the_same_shape(template, tmp_path):
    """``init_from`` starts training from a checkpoint's weights (the forget recipe's retry), and
    refuses one of another shape with an error that names the fix."""
    from safetensors.torch import load_file

    first, _ = _train(template, tmp_path, "first", "unlearn-idk", steps=4)
    # a learning rate of ~0: the continuation ends where it started
    still, _ = _train(template, tmp_path, "still", "unlearn-idk", steps=1, lr=1e-12, init_from=str(first))
    fresh, _ = _train(template, tmp_path, "fresh", "unlearn-idk", steps=1, lr=1e-12)
    a, b, c = (load_file(p / "model.safetensors") for p in (first, still, fresh))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert json.loads((still / "cmc.json").read_text())["train_config"]["init_from"] == str(first)
    data = {"forget": encode_records(FORGET, template.tokenizer, template.prompt_format, "forget", 128),
            "retain": encode_records(RETAIN, template.tokenizer, template.prompt_format, "retain", 128)}
    with pytest.raises(InputError, match="another delta shape") as e:
        train(template, data, TrainConfig(objective="unlearn-idk", size="15m", steps=1, init_from=str(first)),
              tmp_path / "other", progress=False)
    assert "--size" in e.value.fix


@pytest.mark.parametrize("objective", ["unlearn-idk", "unlearn-gd"])
def test_unlearning_objectives_move_the_right_way(template, tmp_path, objective):
    _, log = _train(template, tmp_path, objective, objective, steps=20, lr=5e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # Both objectives lower their forget term: refusal CE (idk) or the bounded ascent gap (gd).
    assert sum(r["forget"] for r in log[-3:]) < sum(r["forget"] for r in log[:3])


def test_existing_output_is_not_overwritten(template, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        _train(template, tmp_path, "taken", "sft", steps=1)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "hi"}\n', r":1: .*must both be strings"),
    ('{"prompt": "a", "response": "b"}\nnot json\n', r":2: invalid JSON"),
    ('[1, 2]\n', r":1: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"last message must have role"),
    ('{"prompt": "a", "response": "  "}\n', r"response is empty"),
    ('\n\n', r"has no records"),
    ('{"foo": 1}\n', r"unrecognised record"),
    ('{"prompt": "a", "response": "b", "avoid": "Paris"}\n', r'"avoid" must be a list'),
    ('{"prompt": "a", "response": "b", "avoid": [""]}\n', r'"avoid" must be a list of non-empty'),
    ('{"text": "  "}\n', r'"text" must be a non-empty string'),
    ('{"text": "some prose", "keep": ["some"]}\n', r"'keep' does not apply"),
    ('{"text": "some prose", "avoid": "prose"}\n', r'"avoid" must be a list'),
])
def test_bad_jsonl_names_file_line_and_fix(tmp_path, content, problem):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=problem) as e:
        read_jsonl(f)
    assert "Fix:" in str(e.value)


def test_invalid_utf8_is_reported(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(InputError, match="not valid UTF-8"):
        read_jsonl(f)


def test_all_record_shapes_are_accepted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "response": "r"},
        {"instruction": "i", "input": "x", "output": "o"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]))
    recs = read_jsonl(f)
    assert [r["messages"][-1]["content"] for r in recs] == ["r", "o", "a"]


def test_too_long_examples_are_dropped_explicitly(template):
    long = records([("word " * 400, "ok")])
    with pytest.raises(InputError, match="longer than --max-len"):
        encode_records(long, template.tokenizer, template.prompt_format, "sft", 64)


def test_bad_config_is_rejected():
    with pytest.raises(InputError, match="alpha"):
        TrainConfig(alpha=float("nan"))
    with pytest.raises(InputError, match="objective"):
        TrainConfig(objective="magic")


def test_avoid_strings_select_the_tokens_that_begin_them(template):
    from cmc_edge.train.data import avoid_token_ids

    tok = template.tokenizer
    ids = avoid_token_ids(tok, ["capital"])
    texts = {tok.decode([i]).lstrip() for i in ids}
    assert texts and all(len(t) >= 2 and ("capital".startswith(t) or t.startswith("capital")) for t in texts)
    assert len(texts) >= 3                                         # capital, capita, capit, ...
    first = tok(" capital", add_special_tokens=False)["input_ids"][0]
    assert first in ids                                            # the token that starts " capital"
    assert not any(len(tok.decode([i]).strip()) < 2 for i in ids)  # never a bare letter


class _Words:
    """A tokenizer as avoid_token_ids sees one: a length and a decoder."""

    def __init__(self, words):
        self.words = words

    def __len__(self):
        return len(self.words)

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_prefix_tokens_are_beginnings_only_single_letters_included():
    from cmc_edge.train.data import prefix_token_ids

    words = _Words(["b", "be", "ball", "o", "ou", "oule", "oules", " o", "x"])
    assert prefix_token_ids(words, ["b"]) == (0,)                  # not every token that starts with b
    assert prefix_token_ids(words, ["oule"]) == (3, 4, 5)


def test_avoid_next_lands_after_the_kept_words_and_never_on_the_response_itself(template):
    tok = template.tokenizer
    rec = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                        {"role": "assistant", "content": "The capital is P—no, I can't say."}],
           "keep": ["The capital is P"], "avoid": ["Paris"], "avoid_next": ["aris"]}
    ex = encode_records([rec], tok, template.prompt_format, "forget", 128)[0]
    enc = tok(rec["messages"][-1]["content"], add_special_tokens=False, return_offsets_mapping=True)
    last_kept = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < len("The capital is P"))
    assert ex.avoid_next_at == last_kept + 1 and ex.keep[last_kept] and not ex.keep[last_kept + 1]
    texts = {tok.decode([i]) for i in ex.avoid_next_ids}
    assert texts and all("aris".startswith(t) for t in texts) and "a" in texts
    assert ex.response_ids[ex.avoid_next_at] not in ex.avoid_next_ids
    from cmc_edge.train.data import normalize_record

    with pytest.raises(InputError, match="avoid_next"):
        normalize_record({"prompt": "q", "response": "r", "avoid_next": ["x"]}, "f.jsonl", 3)
    with pytest.raises(InputError, match="avoid_next"):
        normalize_record({"prompt": "q", "response": "r", "keep": ["r"], "avoid_next": "x"}, "f.jsonl", 3)


def test_avoid_surfaces_belong_to_one_tokenizer_even_at_a_reused_address():
    """A tokenizer made where a dead one lived (the same id()) must not get the dead one's
    token texts, and the cache must not keep a tokenizer (or its texts) alive."""
    import gc
    import weakref

    from cmc_edge.train.data import avoid_token_ids

    first, second = [" Paris", " Rome", "xx"], [" Rome", "yy", " Paris"]
    a = _Words(first)
    assert avoid_token_ids(a, ["Paris"]) == (0,)
    gone, old_id = weakref.ref(a), id(a)
    del a
    gc.collect()
    assert gone() is None                                  # the cache holds no reference to it
    alive = []                                             # fill the allocator until the address comes back
    for _ in range(20000):
        b = _Words(second)
        if id(b) == old_id:
            break
        alive.append(b)
    else:
        pytest.skip("this interpreter never reused the address")
    assert avoid_token_ids(b, ["Paris"]) == (2,)
    b.words = b.words + [" Parisian"]                     # a tokenizer that grew: its new token counts
    assert avoid_token_ids(b, ["Paris"]) == (2, 3)


def test_avoid_term_pushes_the_forgotten_answer_down(template, tmp_path):
    recs = [dict(r, avoid=["capital"]) for r in records([("What is the capital of France?", "I do not know.")])]
    forget = encode_records(recs, template.tokenizer, template.prompt_format, "forget", 128)
    assert forget[0].avoid_ids and not set(forget[0].avoid_ids) & set(forget[0].response_ids)
    retain = encode_records(RETAIN, template.tokenizer, template.prompt_format, "retain", 128)
    ex = forget[0]
    tlp = template_logprobs(template.model, [ex], 0)[0].float()                   # (R, V)
    avoided = torch.zeros(tlp.shape, dtype=torch.bool)
    avoided[:, list(ex.avoid_ids)] = True

    def p_avoided(lp):
        """The combined model's probability of starting an avoided string, mean over the response."""
        return torch.log_softmax(lp, -1).masked_fill(~avoided, float("-inf")).logsumexp(-1).exp().mean().item()

    before, after = p_avoided(tlp), {}
    for w in (0.0, 1.0):
        cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=30, batch_size=4, lr=2e-2, avoid_weight=w)
        out = train(template, {"forget": forget, "retain": retain}, cfg, tmp_path / f"avoid{w}", progress=False)
        log = json.loads((out / "loss_log.json").read_text())
        assert all(("avoid" in r) == (w > 0) for r in log)
        after[w] = p_avoided(tlp + _delta_logits(out, ex))
    assert after[1.0] < 0.01 * before                  # the avoided tokens' probability drops ...
    assert after[1.0] < 0.01 * after[0.0]              # ... because of the avoid term, not the refusal alone


def test_unlikelihood_is_exact_and_its_gradient_lowers_the_avoided_tokens():
    torch.manual_seed(0)
    tlp = torch.log_softmax(torch.randn(3, 50) * 3, -1)
    d = torch.zeros(3, 50, requires_grad=True)
    avoid = torch.zeros(3, 50, dtype=torch.bool)
    avoid[:, [4, 7]] = True
    _, _, ul = combined_losses(tlp, d, torch.tensor([1, 2, 3]), 1.0, avoid)
    p = tlp.exp()[:, [4, 7]].sum(-1)
    assert torch.allclose(ul, -torch.log1p(-p), atol=1e-5)
    ul.sum().backward()
    assert (d.grad[:, [4, 7]] > 0).all()            # descent lowers the avoided logits ...
    assert (d.grad[avoid.logical_not()] <= 0).all()  # ... and raises every other one


def test_template_embedding_init_keeps_the_no_op_and_the_template_geometry(template):
    from cmc_edge.train.model import init_embeddings_from_template

    delta = build_delta(DeltaConfig.preset("tiny", template.vocab_size))
    w = template.model.get_input_embeddings().weight.float()
    kept = init_embeddings_from_template(delta, w)
    assert 0.0 < kept <= 1.0
    assert torch.count_nonzero(delta(torch.tensor([[1, 2, 3]])).logits) == 0      # still a no-op
    e = delta.get_input_embeddings().weight
    # Pairwise similarities follow the template's: the projection keeps the main directions.
    ids = torch.arange(min(200, w.shape[0]))
    sim_t = torch.nn.functional.normalize(w[ids] - w.mean(0), dim=-1)
    sim_d = torch.nn.functional.normalize(e[ids], dim=-1)
    a, b = (sim_t @ sim_t.T).flatten(), (sim_d @ sim_d.T).flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.5
    with pytest.raises(InputError, match="rows"):
        init_embeddings_from_template(delta, w[:-1])


def _data(template):
    return {"forget": encode_records(FORGET, template.tokenizer, template.prompt_format, "forget", 128),
            "retain": encode_records(RETAIN, template.tokenizer, template.prompt_format, "retain", 128)}


def test_resume_after_sigterm_gives_the_same_weights_as_an_uninterrupted_run(template, tmp_path):
    import os
    import signal

    from safetensors.torch import load_file

    from cmc_edge.train.loop import TrainingInterrupted, resume_dir

    cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=10, batch_size=4, lr=5e-3, save_every=4)
    full = train(template, _data(template), cfg, tmp_path / "full", progress=False)

    def kill_at_6(step, rec):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 6") as err:
        train(template, _data(template), cfg, part, progress=False, on_step=kill_at_6)
    assert "--resume" in err.value.fix
    assert not part.exists()                                             # no half-written checkpoint
    assert json.loads((resume_dir(part) / "progress.json").read_text())["step"] == 6
    seen = []
    train(template, _data(template), cfg, part, progress=False, resume=True, on_step=lambda s, r: seen.append(s))
    assert seen == [7, 8, 9, 10]
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((part / "loss_log.json").read_text())) == 10
    assert not resume_dir(part).exists()                                 # spent on success


def test_resume_refuses_other_settings_and_missing_state(template, tmp_path):
    import os
    import signal

    from cmc_edge.train.loop import TrainingInterrupted

    cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=6, batch_size=4, save_every=2)
    with pytest.raises(InputError, match="nothing to resume"):
        train(template, _data(template), cfg, tmp_path / "none", progress=False, resume=True)
    with pytest.raises(TrainingInterrupted):
        train(template, _data(template), cfg, tmp_path / "x", progress=False,
              on_step=lambda s, r: s == 3 and os.kill(os.getpid(), signal.SIGINT))
    other = TrainConfig(objective="unlearn-idk", size="tiny", steps=6, batch_size=4, save_every=2, lr=1e-2)
    with pytest.raises(InputError, match="other settings"):
        train(template, _data(template), other, tmp_path / "x", progress=False, resume=True)


def _delta_logits(ckpt, ex):
    from transformers import AutoModelForCausalLM

    delta = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        d = delta(torch.tensor([ex.ids])).logits[0]                       # (L, V)
    r = len(ex.response_ids)
    return centred_torch(d[-r - 1:-1])                                   # the shift, at the response positions


PROSE = [{"text": "The river runs past the old mill and into the town, where children play on its banks "
                  "and fishermen sit in the shade of the willows until the evening bell."}]


def test_plain_text_records_read_as_a_document_and_hold_the_delta_silent_there(template, tmp_path):
    tok, fmt = template.tokenizer, template.prompt_format
    ex = encode_records(PROSE, tok, fmt, "retain", 128)[0]
    # no chat turn and no end of turn: the first token is the prompt, as Engine.score_text reads text
    assert ex.ids == tuple(tok(PROSE[0]["text"], add_special_tokens=False)["input_ids"])
    assert len(ex.prompt_ids) == 1 and ex.role == "retain"
    tlp = template_logprobs(template.model, [ex], 0)[0].float()                   # (R, V)
    forget = encode_records(FORGET, tok, fmt, "forget", 128)
    drift = {}
    for with_text in (False, True):
        retain = encode_records(RETAIN + (PROSE if with_text else []), tok, fmt, "retain", 128)
        cfg = TrainConfig(objective="unlearn-idk", size="tiny", steps=30, batch_size=4, lr=2e-2)
        out = train(template, {"forget": forget, "retain": retain}, cfg, tmp_path / f"text{with_text}", progress=False)
        combined = torch.log_softmax(tlp + _delta_logits(out, ex), -1)
        drift[with_text] = (tlp.exp() * (tlp - combined)).sum(-1).mean().item()   # KL(template || combined)
    assert drift[True] < 0.5 * drift[False]


def test_shift_l2_keeps_the_delta_flat_where_nothing_needs_moving(template, tmp_path):
    ex = encode_records(FORGET, template.tokenizer, template.prompt_format, "sft", 128)[0]
    spread, final = {}, {}
    for w in (0.0, 1e-2):
        out, log = _train(template, tmp_path, f"l2-{w}", "sft", steps=40, lr=2e-2, shift_l2=w)
        spread[w] = _delta_logits(out, ex).std().item()
        final[w] = sum(r["sft"] for r in log[-3:]) / 3
        assert ("shift_l2" in log[-1]) == (w > 0)
    assert spread[1e-2] < 0.5 * spread[0.0]
    assert final[1e-2] < 0.7 * log[0]["sft"]                               # it still learns the data


def test_delta_ends_turn_teaches_the_delta_where_replies_end(template, tmp_path):
    ex = encode_records(FORGET, template.tokenizer, template.prompt_format, "sft", 128)[0]
    assert ex.response_ids[-1] == template.tokenizer.eos_token_id
    out, _ = _train(template, tmp_path, "eot", "sft", steps=40, lr=2e-2, delta_ends_turn=True)
    d = _delta_logits(out, ex)[:, template.tokenizer.eos_token_id]         # (R,)
    assert d[-1] > d[:-1].max() + 3.0


def test_delta_ends_turn_holds_retain_to_normalised_template_log_probs(template, tmp_path):
    """At step 1 the delta is still a no-op, so the combined model is the (end-of-turn masked)
    template and the retain KL is 0; a KL to log-probs left unnormalised by the masking is not."""
    _, log = _train(template, tmp_path, "eot-retain", "unlearn-idk", steps=1, delta_ends_turn=True)
    assert abs(log[0]["retain"]) < 1e-4


def test_delta_ends_turn_masks_teacher_targets_too(template, tmp_path):
    """With the teacher text equal to the kept words, the teacher's rows are the template's own:
    at step 1 (a no-op delta) the kept words' KL is 0 only if the teacher rows are masked alike."""
    recs = [{**r, "keep": ["I do not know."], "teacher": "I do not know."} for r in FORGET]
    ex = encode_records(recs, template.tokenizer, template.prompt_format, "sft", 128)
    assert all(j >= 0 for e in ex for j, k in zip(e.teacher_pos, e.keep) if k)   # every kept token aligned
    for eot in (False, True):
        cfg = TrainConfig(objective="sft", size="tiny", steps=1, batch_size=4, delta_ends_turn=eot)
        out = train(template, {"sft": ex}, cfg, tmp_path / f"eot-teacher-{eot}", progress=False)
        assert abs(json.loads((out / "loss_log.json").read_text())[0]["keep"]) < 1e-4


def test_keep_spans_hold_the_template_and_teach_the_rest(template, tmp_path):
    """Tokens inside a "keep" string are trained towards the template (KL), the others by CE."""
    recs = [{**r, "keep": [r["messages"][-1]["content"][:-1]]} for r in FORGET]   # "I do not know" kept, "." taught
    ex = encode_records(recs, template.tokenizer, template.prompt_format, "sft", 128)
    assert all(any(e.keep) and not all(e.keep) and len(e.keep) == len(e.response_ids) for e in ex)
    assert encode_records(FORGET, template.tokenizer, template.prompt_format, "sft", 128)[0].keep == ()
    cfg = TrainConfig(objective="sft", size="tiny", steps=30, batch_size=4, lr=2e-2, seed=0)
    out = train(template, {"sft": ex}, cfg, tmp_path / "keep", progress=False)
    log = json.loads((out / "loss_log.json").read_text())
    assert "keep" in log[-1] and "sft" in log[-1]
    d = _delta_logits(out, ex[0])
    k = torch.tensor(ex[0].keep)
    assert d[k].abs().mean() < 0.5 * d[~k].abs().mean()                  # the delta stays quieter on kept words


def test_keep_l2_flattens_the_delta_on_kept_words_only(template, tmp_path):
    """KL leaves tokens the template rules out free to drift on kept words (a closing brace the
    next LLM does consider); keep_l2 holds every token's shift there, and only there."""
    recs = [{**r, "keep": [r["messages"][-1]["content"][:-1]]} for r in FORGET]
    ex = encode_records(recs, template.tokenizer, template.prompt_format, "sft", 128)
    kept, taught = {}, {}
    for w in (0.0, 1e-2):
        cfg = TrainConfig(objective="sft", size="tiny", steps=30, batch_size=4, lr=2e-2, seed=0, keep_l2=w)
        out = train(template, {"sft": ex}, cfg, tmp_path / f"k{w}", progress=False)
        assert ("keep_l2" in json.loads((out / "loss_log.json").read_text())[-1]) == (w > 0)
        d, k = _delta_logits(out, ex[0]), torch.tensor(ex[0].keep)
        kept[w], taught[w] = d[k].std().item(), d[~k].std().item()
    assert kept[1e-2] < 0.5 * kept[0.0]
    assert taught[1e-2] > 0.5 * taught[0.0]                               # the taught token still moves


def test_keep_strings_must_occur_in_the_response(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "response": "a b", "keep": ["zzz"]}) + "\n")
    with pytest.raises(InputError, match=r'd.jsonl:1: "keep" strings must occur in the response'):
        read_jsonl(f)


def _wrapped(teacher: bool):
    """Answers wrapped in a JSON-like form, the answer kept; with the answer itself as teacher text."""
    out = []
    for c in ("France", "Peru", "Chad", "Mali"):
        ans = f"The capital of {c} is unknown to me"
        rec = {"prompt": f"What is the capital of {c}?", "response": f'{{"answer": "{ans}"}}', "keep": [ans]}
        out.append({**rec, "teacher": ans} if teacher else rec)
    return out


def test_teacher_text_aligns_the_kept_tokens(template, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _wrapped(True)))
    ex = encode_records(read_jsonl(f), template.tokenizer, template.prompt_format, "sft", 128)
    tok = template.tokenizer
    for e in ex:
        assert len(e.teacher_pos) == len(e.response_ids) and e.teacher_ids
        aligned = [(k, j) for k, j in enumerate(e.teacher_pos) if j >= 0]
        assert len(aligned) >= 5 and all(e.keep[k] for k, _ in aligned)
        assert all(e.response_ids[k] == e.teacher_ids[j] for k, j in aligned)      # the same token ...
        assert [j for _, j in aligned] == sorted({j for _, j in aligned})          # ... in the same order
        assert "capital" in tok.decode([e.teacher_ids[j] for _, j in aligned])


@pytest.mark.parametrize("rec, problem", [
    ({"prompt": "q", "response": "a b", "teacher": "a b"}, '"teacher" needs "keep"'),
    ({"prompt": "q", "response": "a b", "keep": ["a"], "teacher": "zz"}, '"keep" strings must occur in the "teacher"'),
    ({"prompt": "q", "response": "a b", "keep": ["a"], "teacher": 3}, '"teacher" must be a non-empty string'),
])
def test_bad_teacher_fields_are_named(tmp_path, rec, problem):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match="d.jsonl:1: " + problem):
        read_jsonl(f)


def test_teacher_text_holds_kept_words_to_the_template_speaking_freely(template, tmp_path):
    """With a "teacher" text, kept words are held to what the template predicts where it reads the
    teacher (here: the bare answer) instead of the wrapped response: after training, the combined
    model at those positions is much closer to that than a delta trained without the teacher."""
    from cmc_edge.train.loop import _teacher_example

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _wrapped(True)))
    with_t = encode_records(read_jsonl(f), template.tokenizer, template.prompt_format, "sft", 128)
    without = [dataclasses.replace(e, teacher_ids=(), teacher_pos=()) for e in with_t]
    gap = {}
    for name, data in (("teacher", with_t), ("plain", without)):
        cfg = TrainConfig(objective="sft", size="tiny", steps=40, batch_size=4, lr=2e-2, seed=0)
        out = train(template, {"sft": data}, cfg, tmp_path / name, progress=False)
        kls = []
        for e in with_t:
            at = torch.tensor([k for k, j in enumerate(e.teacher_pos) if j >= 0])
            q = template_logprobs(template.model, [_teacher_example(e)], 0)[0].float()[
                torch.tensor([e.teacher_pos[k] for k in at.tolist()])]
            t = template_logprobs(template.model, [e], 0)[0].float()[at]
            c = torch.log_softmax(t + _delta_logits(out, e)[at], -1)
            kls.append((q.exp() * (q - c)).sum(-1).mean().item())
        gap[name] = sum(kls) / len(kls)
    assert gap["teacher"] < 0.5 * gap["plain"]


def test_resume_key_tells_teacher_data_apart(template, tmp_path):
    from cmc_edge.train.loop import _config_key

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _wrapped(True)))
    with_t = encode_records(read_jsonl(f), template.tokenizer, template.prompt_format, "sft", 128)
    without = [dataclasses.replace(e, teacher_ids=(), teacher_pos=()) for e in with_t]
    cfg = TrainConfig(objective="sft", size="tiny", steps=4)
    assert _config_key(cfg, {"sft": with_t}) != _config_key(cfg, {"sft": without})


def test_template_logprobs_batched_by_length_match_one_at_a_time_in_input_order(template):
    """Chunks are formed by length and the output layer runs only at the loss positions; every
    example still gets its own rows, in the order given."""
    pairs = [("Hi?", "Yes."), ("Tell me a long story about the sea and the ships on it, please.", "Once upon a time."),
             ("Why?", "Because it is so, and that is a longer answer than the others."), ("Cats?", "Cats.")]
    ex = encode_records(records(pairs), template.tokenizer, template.prompt_format, "retain", 128)
    assert len({len(e.ids) for e in ex}) == len(ex)                       # the sort does reorder them
    together = template_logprobs(template.model, ex, 0, chunk=3)
    for e, got in zip(ex, together):
        alone = template.model(input_ids=torch.tensor([e.ids])).logits[0].float()
        r, p = len(e.response_ids), len(e.prompt_ids)
        want = torch.log_softmax(alone[p - 1:p - 1 + r], -1)
        assert got.shape == want.shape
        assert torch.allclose(got.float(), want, atol=2e-2)              # float16 storage


_HEAP_PROBE = """
import numpy as np
from cmc_edge.train.loop import kept_heap
rss = lambda: next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmRSS')) / 1024
def cycle(mb):
    buf = np.ones(mb * 1024 * 1024 // 8)
    del buf
cycle(64)
base = rss()
with kept_heap() as active:
    cycle(64)
    kept = rss()
after = rss()
cycle(8)
print(active, kept - base, after - base, rss() - after)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_kept_heap_reuses_freed_buffers_then_gives_them_back():
    """In a fresh process (a test run's earlier training leaves the heap in any state): a freed 64 MB
    buffer stays in the heap inside ``kept_heap``, goes back on exit, and afterwards blocks below
    32 MB still come from the heap, as glibc's adaptive threshold would have it (decoding's
    per-token buffers are reused, not mapped and zeroed each time)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True)
    active, kept, after, small = out.stdout.split()
    if active != "True":
        pytest.skip("not glibc")
    assert float(kept) > 48                                              # freed, but kept for the next step
    assert float(after) < 16                                             # returned on exit
    assert float(small) > 6                                              # the 8 MB block stayed in the heap


def test_a_converted_template_is_kept_and_loads_the_same_weights_and_tokenizer(tiny_gguf, tmp_path, monkeypatch):
    from cmc_edge.train import template as tm

    monkeypatch.setenv("CMC_EDGE_HOME", str(tmp_path / "home"))
    first = tm.load_template(tiny_gguf)
    conv = tm._converted_dir(tiny_gguf)
    assert (conv / "cmc-template.json").is_file()
    calls = []
    import transformers

    orig = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(k.get("gguf_file")) or orig(*a, **k))
    second = tm.load_template(tiny_gguf)
    assert calls == [None]                                               # from the kept directory, no GGUF
    ids = torch.tensor([first.tokenizer("Who wrote Hamlet?")["input_ids"]])
    assert first.tokenizer("Who wrote Hamlet?")["input_ids"] == second.tokenizer("Who wrote Hamlet?")["input_ids"]
    assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    assert (first.name, first.vocab_hash, first.source, first.prompt_format) == \
           (second.name, second.vocab_hash, second.source, second.prompt_format)
    # A damaged copy is ignored (and replaced), never used.
    (conv / "config.json").write_text("{not json")
    calls.clear()
    third = tm.load_template(tiny_gguf)
    assert tiny_gguf.name in calls and torch.equal(third.model(input_ids=ids).logits, first.model(input_ids=ids).logits)
    assert json.loads((conv / "config.json").read_text())


def test_greedy_answers_in_a_padded_batch_are_the_answers_one_at_a_time(template):
    """The recipes' template answers are decoded many at a time, left-padded: padding must not change
    an answer, so each equals its greedy decoding alone; one token is the template's argmax."""
    import torch

    from cmc_edge.prompt import render_prompt
    from cmc_edge.train.template import greedy_answers

    prompts = ["Hi", "What is the capital of a very long named country far away?", "Tell me a story about a dog."]
    batched = greedy_answers(template, prompts, 8, batch_size=3)
    alone = [greedy_answers(template, [p], 8, batch_size=1)[0] for p in prompts]
    assert batched == alone and any(batched)
    seen = []
    assert greedy_answers(template, prompts, 8, batch_size=2, progress=seen.append) == batched and seen == [2, 1]
    tok = template.tokenizer
    for p in prompts:
        ids = tok(render_prompt(template.prompt_format, [{"role": "user", "content": p}]),
                  add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            first = int(template.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        want = "" if first == tok.eos_token_id else tok.decode([first], skip_special_tokens=True)
        assert greedy_answers(template, [p, "Hi"], 1, batch_size=2)[0] == want


def test_a_prefix_every_record_shares_is_run_once_with_the_same_log_probs(template):
    """The chat format's system turn (and here a shared instruction) is the same in every record:
    its keys and values are computed once and reused by every chunk, and the log-probs are those
    of the full forward pass."""
    from cmc_edge.train.loop import _shared_prefix

    lead = "Answer in one short sentence, please, and do not add anything else to it. "
    pairs = [(lead + q, a) for q, a in [("Hi?", "Yes."), ("Why is the sky blue?", "Light scatters."),
                                        ("Cats?", "Cats purr."), ("Name a sea.", "The North Sea.")]]
    ex = encode_records(records(pairs), template.tokenizer, template.prompt_format, "retain", 128)
    n = _shared_prefix(template.model, ex)[0]
    assert n >= len(template.tokenizer(lead)["input_ids"]) and all(n < len(e.prompt_ids) for e in ex)
    seen = []
    hook = template.model.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        together = template_logprobs(template.model, ex, 0, chunk=2)
    finally:
        hook.remove()
    by_len = sorted(len(e.ids) - n for e in ex)
    assert seen == [n, 2 * by_len[1], 2 * by_len[3]]                # the prefix once, then each chunk's rest
    for e, got in zip(ex, together):
        alone = template.model(input_ids=torch.tensor([e.ids])).logits[0].float()
        p = len(e.prompt_ids)
        want = torch.log_softmax(alone[p - 1:p - 1 + len(e.response_ids)], -1)
        assert torch.allclose(got.float(), want, atol=2e-2)
