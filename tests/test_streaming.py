"""Property tests (hypothesis) for the streaming UTF-8 text path: token bytes in, text chunks out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cmc_edge.runtime.engine import TextStream
from cmc_edge.runtime.sync import complete_utf8_prefix

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)   # any valid Unicode


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None)
@given(TEXT, st.lists(st.integers(0, 400), max_size=30))
def test_any_byte_split_streams_back_the_exact_text(text, cuts):
    ts = TextStream()
    chunks = [ts.push(p)[0] for p in split_bytes(text.encode(), cuts)] + [ts.finish()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


@settings(max_examples=300, deadline=None)
@given(TEXT, st.text(min_size=1, max_size=4), st.lists(st.integers(0, 400), max_size=30))
def test_stop_strings_are_never_emitted_and_cut_at_their_first_occurrence(text, stop, cuts):
    ts = TextStream(stop=(stop,))
    out, stopped = [], False
    for p in split_bytes(text.encode(), cuts):
        chunk, stopped = ts.push(p)
        out.append(chunk)
        if stopped:
            break
    if not stopped:
        out.append(ts.finish())
    emitted = "".join(out)
    i = text.find(stop)
    assert emitted == (text if i < 0 else text[:i])
    assert stopped == (i >= 0)


@settings(max_examples=300, deadline=None)
@given(TEXT, st.integers(0, 400))
def test_complete_prefix_holds_back_only_an_unfinished_character(text, k):
    data = text.encode()
    k = k % (len(data) + 1)
    prefix = complete_utf8_prefix(data[:k])
    assert text.startswith(prefix)
    assert len(data[:k]) - len(prefix.encode()) <= 3      # at most one unfinished character held back


@given(st.binary(max_size=40))
def test_invalid_bytes_become_replacement_characters_not_errors(data):
    ts = TextStream()
    text = "".join(ts.push(data[i:i + 3])[0] for i in range(0, len(data), 3)) + ts.finish()
    assert text == data.decode("utf-8", errors="replace")
