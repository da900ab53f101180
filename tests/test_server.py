"""`cmc-edge serve` end to end: the official openai client against a live server on localhost."""

from __future__ import annotations

import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("torch")  # the tiny bundle is exported with torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from tiny_checkpoint import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def engine(tiny_gguf, tiny_bundle):
    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=512, n_threads=1)
    return Engine(target, [Delta(tiny_bundle, target, alpha=1.0)])


@pytest.fixture(scope="module")
def server(engine):
    from cmc_edge.runtime.server import ServerLimits, ServerSettings, create_app

    app = create_app(engine, ServerSettings(model_name="tiny", limits=ServerLimits(max_tokens=64, max_prompt_tokens=200)))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_the_engine(client, engine):
    from cmc_edge.runtime.engine import SamplingParams

    r = client.completions.create(model="tiny", prompt="The capital of", max_tokens=12, temperature=0)
    direct = engine.generate("The capital of", SamplingParams(max_tokens=12, temperature=0.0)).read()
    assert r.choices[0].text == direct
    assert r.usage.completion_tokens <= 12


def test_alpha_per_request_changes_the_output(client, engine):
    from cmc_edge.runtime.engine import SamplingParams

    kw = dict(model="tiny", messages=[{"role": "user", "content": "The capital of France"}], max_tokens=16,
              temperature=0)
    off = client.chat.completions.create(**kw, extra_body={"cmc": {"alphas": [0.0]}}).choices[0].message.content
    on = client.chat.completions.create(**kw, extra_body={"cmc": {"alpha": 4.0}}).choices[0].message.content
    tgt, _ = engine.chat_prompts(kw["messages"])
    assert off == engine.generate(tgt, SamplingParams(max_tokens=16, temperature=0.0), alphas=[0.0]).read()
    assert on != off


def test_streaming_chat_reassembles_to_the_full_answer(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)]
    assert "".join(parts) == full


@pytest.mark.parametrize("kw, status", [
    ({"max_tokens": 10_000}, 400),
    ({"prompt": "word " * 400}, 400),
    ({"extra_body": {"cmc": {"alphas": [1.0, 2.0]}}}, 400),
    ({"extra_body": {"cmc": {"alpha": "nan"}}}, 400),
])
def test_limits_and_bad_requests(client, kw, status):
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status


def test_concurrent_requests_are_served_safely(client):
    results, errors = [], []

    def ask(i):
        try:
            r = client.completions.create(model="tiny", prompt=f"Item {i}:", max_tokens=8, temperature=0)
            results.append((i, r.choices[0].text))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i % 3,)) for i in range(9)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 9
    by_prompt = {}
    for i, text in results:
        by_prompt.setdefault(i, set()).add(text)
    assert all(len(v) == 1 for v in by_prompt.values())  # same prompt, same greedy answer: no state bleed


def test_api_key_required_when_set(engine):
    from cmc_edge.runtime.server import ServerSettings, create_app

    with LiveServer(create_app(engine, ServerSettings(model_name="tiny", api_key="s3cret"))) as live:
        bad = openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=live.url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"


def test_refuses_public_bind_without_key():
    from cmc_edge.errors import InputError
    from cmc_edge.runtime.server import ServerSettings

    with pytest.raises(InputError, match="API key"):
        ServerSettings(host="0.0.0.0", api_key=None)
    assert ServerSettings(host="0.0.0.0", api_key="k").host == "0.0.0.0"


def test_delta_fault_is_a_500_and_stream_error(tiny_gguf):
    from test_fail_closed import FaultyDelta

    from cmc_edge.runtime.engine import Engine
    from cmc_edge.runtime.server import ServerSettings, create_app
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    eng = Engine(target, [FaultyDelta(target.n_vocab, ok_calls=2, mode="raise")])
    with LiveServer(create_app(eng, ServerSettings(model_name="tiny"))) as live:
        c = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=1.0, seed=1)
        with pytest.raises(openai.APIError):
            for _ in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=30, temperature=1.0, seed=1, stream=True):
                pass


def test_request_timeout_stops_generation_with_504_and_the_server_stays_usable(tiny_gguf):
    """A generation that outlives --request-timeout is stopped in the decode loop: a 504 (an SSE error
    event mid-stream), and the engine is free for the next request at once."""
    from test_fail_closed import FaultyDelta

    from cmc_edge.errors import GenerationTimeout
    from cmc_edge.runtime.engine import Engine, SamplingParams
    from cmc_edge.runtime.server import ServerLimits, ServerSettings, create_app
    from cmc_edge.runtime.target import TargetLLM

    target = TargetLLM(tiny_gguf, n_ctx=256, n_threads=1)
    slow = FaultyDelta(target.n_vocab, ok_calls=10**9, mode="raise")   # a zero shift that takes 50 ms a token
    feed = slow.session.feed
    slow.session.feed = lambda ids: (time.sleep(0.05), feed(ids))[1]
    eng = Engine(target, [slow])
    tgt, _ = eng.chat_prompts([{"role": "user", "content": "hello"}])
    for prompt in ("The capital of", tgt):          # the two prompts below, unhindered: 40+ tokens, 2+ s
        unhindered = eng.generate(prompt, SamplingParams(max_tokens=64, temperature=0), alphas=[0.0])
        unhindered.read()
        assert len(unhindered.tokens) >= 40
    gen = eng.generate("The capital of", SamplingParams(max_tokens=64, temperature=0),
                       deadline=time.monotonic() + 0.3)
    with pytest.raises(GenerationTimeout, match="time limit"):
        gen.read()
    assert len(gen.tokens) < 40                      # stopped in the decode loop
    limits = ServerLimits(max_tokens=64, request_timeout_s=0.5)
    with LiveServer(create_app(eng, ServerSettings(model_name="tiny", limits=limits))) as live:
        c = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt="The capital of", max_tokens=64, temperature=0)
        assert e.value.status_code == 504 and "time limit" in str(e.value)
        assert time.monotonic() - t0 < 2.0
        parts = []
        with pytest.raises(openai.APIError, match="time limit"):
            for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                   max_tokens=64, temperature=0, stream=True):
                parts.append(chunk.choices[0].delta.content or "")
        assert "".join(parts)                      # it was streaming when the limit hit
        r = c.completions.create(model="tiny", prompt="The capital of", max_tokens=4, temperature=0,
                                 extra_body={"cmc": {"alpha": 0.0}})
        direct = eng.generate("The capital of", SamplingParams(max_tokens=4, temperature=0.0), alphas=[0.0]).read()
        assert r.choices[0].text == direct and r.usage.completion_tokens == 4


def test_serve_passes_request_timeout(tiny_gguf, monkeypatch):
    import cmc_edge.runtime.server as server
    from cmc_edge.cli import main

    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, settings: seen.update(settings=settings) or 0)
    assert main(["serve", "--model", str(tiny_gguf), "--no-delta", "--request-timeout", "7.5", "--max-queue", "3"]) == 0
    assert seen["settings"].limits.request_timeout_s == 7.5 and seen["settings"].limits.max_queue == 3
    assert main(["serve", "--model", str(tiny_gguf), "--no-delta"]) == 0
    assert seen["settings"].limits.request_timeout_s == 120.0
    assert seen["settings"].model_name == "tiny" and seen["settings"].policies == ()
