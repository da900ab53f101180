"""Re-sync of the delta's own tokenization: roll back to the common prefix, never recompute from scratch."""

import numpy as np
import pytest

from cmc_edge.runtime.sync import DeltaTracker, complete_utf8_prefix


class FakeDelta:
    """A deterministic 'model': logits are a hash of the whole sequence so far; counts fed tokens."""

    def __init__(self, max_positions=1024, vocab=7):
        self.max_positions, self.vocab = max_positions, vocab
        self.seq, self.fed_total, self.rollbacks = [], 0, 0

    @property
    def n_past(self):
        return len(self.seq)

    def feed(self, ids):
        assert ids, "feed needs at least one token"
        self.seq.extend(ids)
        self.fed_total += len(ids)
        assert len(self.seq) <= self.max_positions
        return self.logits(self.seq)

    @staticmethod
    def logits(seq):
        rng = np.random.default_rng(abs(hash(tuple(seq))) % (2**32))
        return rng.normal(size=7).astype(np.float32)

    def rollback(self, n):
        assert n <= len(self.seq)
        self.rollbacks += 1
        del self.seq[n:]

    def reset(self):
        self.seq = []


def greedy_words(text):
    """A toy tokenizer that re-segments: digits group in pairs, words whole, else per char."""
    import re

    return [sum(map(ord, t)) % 1000 + len(t) * 1000 for t in re.findall(r"\d{1,2}|\w+| +|\S", text)]


@pytest.mark.parametrize("text", [
    "The capital is Paris.",
    "Numbers: 12345 and 3.14159",
    "spaces     then\n\n\ttabs",
    "def f(x):\n    return x**2  # code",
    "東京は日本の首都です。",
    "emoji 🎉🚀 done 👍🏽",
])
def test_incremental_sync_equals_from_scratch(text):
    """Feed the text byte by byte (as target tokens arrive); logits always equal a fresh run."""
    delta = FakeDelta()
    tr = DeltaTracker(delta, greedy_words, [1, 2, 3])
    data = text.encode()
    for i in range(1, len(data) + 1):
        got = tr.state_for(data[:i])
        shown = complete_utf8_prefix(data[:i])
        expect = FakeDelta.logits([1, 2, 3] + greedy_words(shown))
        np.testing.assert_array_equal(got, expect)
    # Incremental: far fewer tokens fed than recomputing the sequence at every step.
    scratch = sum(3 + len(greedy_words(complete_utf8_prefix(data[:i]))) for i in range(1, len(data) + 1))
    assert delta.fed_total < scratch / 2


def test_resegmentation_rolls_back_instead_of_recomputing():
    delta = FakeDelta()
    tr = DeltaTracker(delta, greedy_words, [5])
    tr.state_for(b"12")
    tr.state_for(b"123")   # "12" + "3": grows
    before = delta.fed_total
    tr.state_for(b"1234")  # "12" + "34": the last token is re-segmented
    assert tr.resyncs >= 1
    assert delta.fed_total - before <= 2  # only the changed tail was fed
    assert delta.seq == [5] + greedy_words("1234")


def test_partial_utf8_is_held_back():
    euro = "€".encode()
    assert complete_utf8_prefix(b"ab" + euro[:2]) == "ab"
    assert complete_utf8_prefix(b"ab" + euro) == "ab€"
    assert complete_utf8_prefix("🎉".encode()[:3]) == ""
    assert complete_utf8_prefix(b"\xff") == "\ufffd"  # invalid, not incomplete: shown, not held forever


def test_sliding_window_instead_of_a_crash():
    delta = FakeDelta(max_positions=16)
    tr = DeltaTracker(delta, lambda s: [ord(c) for c in s], [1, 2])
    text = b"abcdefghijklmnopqrstuvwxyz0123456789"
    for i in range(1, len(text) + 1):
        got = tr.state_for(text[:i])
        assert len(delta.seq) <= 16
        # The delta sees the most recent tokens, ending with the newest one.
        assert delta.seq[-1] == text[i - 1]
        np.testing.assert_array_equal(got, FakeDelta.logits(delta.seq))
    assert tr.window_shifts >= 1


# -- tail encoding ---------------------------------------------------------------------------

FRAGMENTS = ["  ", " ", "\n", "\n\n", "\t", " \n", "'s", "'", "'ll", "'re", "n't", "123", "4", " 56", "7.5",
             "abc", " de", "Paris", " the", "!!", "?", " (", ")", "x**2", "#", " #", "$", "é", "日本", "は",
             "🎉", "👍🏽", "\u200d", " -", "--", "...", "“", "”", "\r\n"]


def byte_level_tokenizers():
    from tiny_checkpoint import make_tiny_tokenizer

    return {"tiny": make_tiny_tokenizer().backend_tokenizer}


def random_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(FRAGMENTS, size=int(rng.integers(5, 40)))) for _ in range(n)]


def check_tail_encoding(tok, texts):
    from cmc_edge.runtime.sync import TailEncoder

    whole = lambda t: tok.encode(t, add_special_tokens=False).ids          # noqa: E731
    settled = 0
    for text in texts:
        te, data = TailEncoder(tok), text.encode()
        for i in range(1, len(data) + 1):                  # byte by byte, as target tokens arrive
            shown = complete_utf8_prefix(data[:i])
            assert te.encode(shown) == whole(shown), (text, i)
        settled += len(te.settled_text) > 0
    return settled


def test_tail_encoding_equals_whole_text_encoding():
    from cmc_edge.runtime.sync import TailEncoder

    import json
    for name, tok in byte_level_tokenizers().items():
        assert TailEncoder.applies(json.loads(tok.to_str())), name
        texts = random_texts(150) + ["def f(x):\n    return x**2  # code\n\n\n    pass", "東京は日本の首都です。",
                                     "emoji 🎉🚀 done 👍🏽", "Numbers: 12345 and 3.14159", "it's   we'll\n\n  they're"]
        # The tail really is short: most texts settle a prefix (else this would test nothing).
        assert check_tail_encoding(tok, texts) > 0.9 * len(texts)


@pytest.mark.gguf
def test_tail_encoding_equals_whole_text_encoding_for_smollm2(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name).backend_tokenizer
    assert check_tail_encoding(tok, random_texts(60, seed=1)) > 50


def test_tail_encoding_only_where_it_is_exact():
    from cmc_edge.runtime.sync import TailEncoder

    byte_level = {"normalizer": None, "model": {"type": "BPE", "dropout": None},
                  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert TailEncoder.applies(byte_level)
    for change in [{"normalizer": {"type": "NFC"}},                                 # may merge across the cut
                   {"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "first"}},  # Gemma, Llama 2
                   {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
                   {"pre_tokenizer": {"type": "Sequence", "pretokenizers": []}},
                   {"model": {"type": "BPE", "dropout": 0.1}},
                   {"model": {"type": "Unigram"}}]:
        assert not TailEncoder.applies({**byte_level, **change}), change


def test_tracker_with_tail_encoding_feeds_what_whole_encoding_feeds():
    from cmc_edge.runtime.sync import TailEncoder

    tok = byte_level_tokenizers()["tiny"]
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids             # noqa: E731
    data = "The capital of Italy is Rome,   and 1234 5678 héllo wörld ∑ 日本\n\n  it's".encode() * 3
    a, b, tail = FakeDelta(), FakeDelta(), TailEncoder(tok)
    ta, tb = DeltaTracker(a, enc, [1, 2]), DeltaTracker(b, enc, [1, 2], tail=tail)
    for i in range(1, len(data) + 1):
        np.testing.assert_array_equal(ta.state_for(data[:i]), tb.state_for(data[:i]))
    assert a.seq == b.seq
    assert len(tail.settled_text) > len(data.decode()) - 20          # only the last few pre-tokens re-encoded
