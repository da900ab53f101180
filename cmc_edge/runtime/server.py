"""`cmc-edge serve` (needs the ``[serve]`` extra): an OpenAI-compatible HTTP server (FastAPI) over a CMC engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events). Per request, the extra field ``"cmc": {"alphas": [...]}``
(one per loaded delta, 0 disables one) or ``"cmc": {"alpha": x}`` (all deltas) steers the deltas;
the official ``openai`` client passes it with ``extra_body``.

Safety: binds 127.0.0.1 by default and refuses another address without an API key; limits the
body size, the prompt length and ``max_tokens``; one generation at a time per engine (a lock);
a delta failure is a 500 with a JSON error (or an SSE error event mid-stream), never unfiltered text.
Each request has a time limit (``--request-timeout``, waiting for the engine included): the decode
loop checks it every token and stops, and the client gets a 504 (or an SSE error event mid-stream).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cmc_edge.errors import CmcError, DeltaFault, GenerationTimeout, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    request_timeout_s: float = 120.0

    def __post_init__(self):
        t = self.request_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"the request timeout must be a positive number of seconds, got {t!r}",
                             fix="e.g. --request-timeout 120")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine, *, model_name: str, api_key: str | None = None, limits: ServerLimits = ServerLimits()):
    from cmc_edge.runtime.engine import SamplingParams

    app = FastAPI(title="cmc-edge", version="1")
    lock = threading.Lock()

    def err(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    def error_of(exc: CmcError) -> dict:
        """HTTP status and OpenAI-style type for an error: bad request 400, time limit 504, delta fault 500."""
        if isinstance(exc, DeltaFault):
            return {"message": str(exc), "type": "delta_fault", "code": 500}
        if isinstance(exc, GenerationTimeout):
            return {"message": str(exc), "type": "timeout", "code": 504}
        return {"message": str(exc), "type": "invalid_request_error", "code": 400}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return err(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and int(size) > limits.max_body_bytes:
            return err(413, f"request body over {limits.max_body_bytes} bytes")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "cmc-edge",
                                            "deltas": [{"name": d.name, "alpha": d.alpha} for d in engine.deltas]}]}

    def parse(body: dict):
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object", fix="send OpenAI-style JSON")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 256
        if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > limits.max_tokens:
            raise InputError(f"max_tokens must be an integer in 1..{limits.max_tokens}, got {max_tokens!r}",
                             fix="lower max_tokens (the server's limit is --max-tokens-limit)")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        temperature = body.get("temperature", 1.0)
        params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature if temperature is not None else 1.0),
                                top_p=float(body.get("top_p") or 1.0), top_k=0 if body.get("top_p") else 40,
                                min_p=0.0 if body.get("top_p") else 0.05, seed=body.get("seed"), stop=stop)
        cmc = body.get("cmc") or {}
        if not isinstance(cmc, dict):
            raise InputError('"cmc" must be an object', fix='e.g. "cmc": {"alphas": [1.0]}')
        alphas = None
        if "alphas" in cmc:
            alphas = cmc["alphas"]
            if not isinstance(alphas, list) or len(alphas) != len(engine.deltas):
                raise InputError(f'"cmc.alphas" needs {len(engine.deltas)} numbers (one per loaded delta)',
                                 fix="see GET /v1/models for the loaded deltas")
        elif "alpha" in cmc:
            alphas = [cmc["alpha"]] * len(engine.deltas)
        return params, alphas

    def start(body, chat: bool, deadline: float):
        params, alphas = parse(body)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise InputError('"messages" must be a non-empty list', fix="send chat messages")
            tgt, dps = engine.chat_prompts(msgs)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise InputError('"prompt" must be a string', fix="send one prompt string per request")
            tgt, dps = prompt, None
        n = len(engine.target.tokenize(tgt))
        if n > limits.max_prompt_tokens:
            raise InputError(f"the prompt has {n} tokens; this server accepts {limits.max_prompt_tokens}",
                             fix="shorten the prompt (the limit is --max-prompt-tokens)")
        return engine.generate(tgt, params, delta_prompts=dps, alphas=alphas, deadline=deadline)

    def run_locked(body, chat: bool, on_chunk):
        """Run one generation under the engine lock, within the request's time limit; returns the Generation."""
        deadline = time.monotonic() + limits.request_timeout_s
        if not lock.acquire(timeout=limits.request_timeout_s):
            raise GenerationTimeout(f"the server stayed busy for the request's whole time limit "
                                    f"({limits.request_timeout_s:g} s)", fix="retry later")
        try:
            gen = start(body, chat, deadline)
            for chunk in gen:        # the decode loop raises GenerationTimeout past the deadline
                on_chunk(chunk)
            return gen
        finally:
            lock.release()

    def complete(body: dict, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            return stream(body, chat, rid, created)
        try:
            gen = run_locked(body, chat, lambda c: None)
        except CmcError as exc:
            e = error_of(exc)
            return err(e["code"], e["message"], e["type"])
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.tokens),
                 "total_tokens": gen.prompt_tokens + len(gen.tokens)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                      "finish_reason": gen.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}],
                "usage": usage}

    def stream(body, chat, rid, created):
        import queue

        # Unbounded (max_tokens bounds it): a client that stops reading must not block the worker, which
        # holds the engine lock until its generation ends (at max_tokens or the time limit).
        q: queue.Queue = queue.Queue()
        done = object()
        try:
            parse(body)  # validate before the 200 status goes out
        except CmcError as exc:
            return err(400, str(exc))

        def chunk_obj(text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        def worker():
            try:
                gen = run_locked(body, chat, lambda c: q.put(("chunk", c)))
                q.put(("end", gen.finish_reason))
            except CmcError as exc:
                q.put(("error", error_of(exc)))
            except Exception as exc:  # noqa: BLE001 - the stream must end with an error, not hang
                log.exception("generation failed")
                q.put(("error", {"message": f"internal error: {exc!r}", "type": "server_error", "code": 500}))
            finally:
                q.put((done, None))

        threading.Thread(target=worker, daemon=True, name="cmc-gen").start()

        def events():
            if chat:
                yield f"data: {json.dumps(chunk_obj(role=True))}\n\n"
            while True:
                kind, val = q.get()
                if kind is done:
                    break
                if kind == "chunk":
                    yield f"data: {json.dumps(chunk_obj(val))}\n\n"
                elif kind == "end":
                    yield f"data: {json.dumps(chunk_obj(finish=val))}\n\n"
                    yield "data: [DONE]\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': val})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def body_of(request: Request):
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return None, err(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            return json.loads(raw), None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, err(400, "the request body is not valid JSON")

    from starlette.concurrency import run_in_threadpool

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, bad = await body_of(request)
        if bad is not None:
            return bad
        return await run_in_threadpool(complete, body, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, bad = await body_of(request)
        if bad is not None:
            return bad
        return await run_in_threadpool(complete, body, True)

    return app


def serve(args) -> int:
    import uvicorn

    from cmc_edge.cli import build_engine

    if not is_loopback(args.host) and not args.api_key:
        raise InputError(f"refusing to listen on {args.host} without an API key",
                         fix="pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or use --host 127.0.0.1")
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          request_timeout_s=args.request_timeout)
    engine = build_engine(args)
    app = create_app(engine, model_name=engine.target.path.stem, api_key=args.api_key, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
