"""`cmc-edge serve` (needs the ``[serve]`` extra): an OpenAI-compatible HTTP server (FastAPI) over a CMC engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events). Request bodies are the pydantic models in
:mod:`.types`; the OpenAPI schema is at ``/openapi.json``.

Deltas, per request: ``"cmc": {"deltas": {"json": 1.0}}`` sets deltas by name (the official
``openai`` client passes it with ``extra_body``); the older ``"cmc": {"alphas": [...]}`` (one per
loaded delta) and ``"cmc": {"alpha": x}`` (all) still work. The operator's policy
(:mod:`cmc_edge.runtime.policy`) decides what a request may change: an enforced delta (an
unlearning filter) cannot be switched off, lowered below its floor or inverted (403).

Safety: text from clients is data: message contents (and completion prompts, unless the operator
allows raw prompts) are never parsed as special tokens, on the target side or the deltas'. Binds
127.0.0.1 by default and refuses another address without an API key (compared in constant time).
Limits the body size (with or without ``Content-Length``), the prompt length and ``max_tokens``.
Every error is an OpenAI-style JSON body with its real status: 400 bad request, 401 key, 403
policy, 413 body, 429 queue full (``Retry-After``), 500 llama.cpp failure, 503 delta failure (a
filter never fails open), 504 time limit. A streaming response validates the request and pulls
its first chunk before the 200 goes out; a later failure is an SSE error event. A client that
disconnects stops its generation before the next token.

Layout: settings and errors, the :class:`Guard` middleware (API key, body limit), the request
handlers (module-level functions over a :class:`ServerState`), and :func:`create_app`, which
wires them; the queue in front of the engine is :mod:`.runner`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cmc_edge.errors import CmcError, DeltaFault, GenerationTimeout, InputError, PolicyError, TargetFault
from cmc_edge.prompt import Prompt
from cmc_edge.runtime.engine import EncodedPrompt, SamplingParams
from cmc_edge.runtime.policy import DeltaPolicy, build_policies, resolve_alphas
from cmc_edge.runtime.server.runner import EngineRunner, ServerBusy
from cmc_edge.runtime.server.types import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    request_timeout_s: float = 120.0
    max_queue: int = 16

    def __post_init__(self):
        t = self.request_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"the request timeout must be a positive number of seconds, got {t!r}",
                             fix="e.g. --request-timeout 120")
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}",
                                 fix=f"pass --{name.replace('_', '-')} N with N >= 1")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InputError(f"max_queue must be an integer >= 0, got {self.max_queue!r}", fix="e.g. --max-queue 16")


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs besides the engine. ``policies``: one per loaded delta, in load
    order (None: each bundle's default, see :func:`~cmc_edge.runtime.policy.build_policies`)."""

    model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    policies: tuple[DeltaPolicy, ...] | None = None
    allow_raw_prompts: bool = False

    def __post_init__(self):
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(f"refusing to listen on {self.host} without an API key",
                             fix="pass --api-key KEY (clients send 'Authorization: Bearer KEY'), "
                                 "or use --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and OpenAI-style error type of an exception."""
    for cls, status, kind in ((PolicyError, 403, "permission_error"), (ServerBusy, 429, "rate_limit_error"),
                              (GenerationTimeout, 504, "timeout"), (DeltaFault, 503, "delta_fault"),
                              (TargetFault, 500, "llm_fault"), (CmcError, 400, "invalid_request_error")):
        if isinstance(exc, cls):
            return status, kind
    return 500, "server_error"


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(exc: BaseException) -> JSONResponse:
    status, kind = error_status(exc)
    message = str(exc) if isinstance(exc, CmcError) else "internal error (see the server's log)"
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ServerBusy) else None
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: API key (constant-time), then the body read whole
    within ``max_body_bytes`` (``Content-Length`` checked first; chunked bodies counted as they come)
    and handed on to the app."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())

        async def reject(status, message, kind="invalid_request_error"):
            await JSONResponse(error_body(status, message, kind), status_code=status)(scope, receive, send)

        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await reject(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                "authentication_error")
        size = headers.get(b"content-length")
        if size is not None and not size.isdigit():
            return await reject(400, "the Content-Length header is not a number")
        if size is not None and int(size) > self.max_body:
            return await reject(413, f"request body over {self.max_body} bytes")
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                return await reject(413, f"request body over {self.max_body} bytes")
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()               # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


class ServerState:
    """What the routes share: the engine, the settings, one policy per delta, the queue."""

    def __init__(self, engine, settings: ServerSettings):
        self.engine, self.settings, self.limits = engine, settings, settings.limits
        self.policies = settings.policies if settings.policies is not None else build_policies(engine.deltas)
        if [p.name for p in self.policies] != [d.name for d in engine.deltas]:
            raise InputError("the server's delta policies do not match the engine's deltas",
                             fix="build them with cmc_edge.runtime.policy.build_policies(engine.deltas)")
        self.runner = EngineRunner(engine, max_queue=self.limits.max_queue)
        # an enforced filter reads the whole conversation: a generation ends before its window would slide
        self.whole = [p.mode == "enforced" for p in self.policies]

    def sampling(self, req, chat: bool) -> SamplingParams:
        """The request's sampling, within the server's limits (llama-cpp-python's defaults without top_p)."""
        limit = self.limits.max_tokens
        max_tokens = req.max_tokens or req.max_completion_tokens or min(256, limit)
        if max_tokens > limit:
            raise InputError(f"max_tokens must be at most {limit}, got {max_tokens}",
                             fix="lower max_tokens (the server's limit is --max-tokens-limit)")
        nucleus = req.top_p is not None
        params = SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p if nucleus else 1.0,
            top_k=req.top_k if req.top_k is not None else (0 if nucleus else 40),
            min_p=req.min_p if req.min_p is not None else (0.0 if nucleus else 0.05),
            repeat_penalty=req.repeat_penalty if req.repeat_penalty is not None else 1.0,
            seed=req.seed, stop=req.stop_strings())
        return self.engine.chat_params(params) if chat else params

    def alphas(self, req) -> list[float]:
        """Each delta's alpha for this request, within the operator's policy (403 otherwise)."""
        c = req.cmc
        if c is None:
            return [p.alpha for p in self.policies]
        return resolve_alphas(self.policies, alpha=c.alpha, alphas=c.alphas, by_name=c.deltas)

    def encode(self, req, chat: bool) -> EncodedPrompt:
        """Render and tokenize (in a worker thread: reads only the vocabularies) and check the length.
        Message contents, and completion prompts unless raw prompts are allowed, are data."""
        if chat:
            tgt, dps = self.engine.chat_prompts([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            tgt, dps = (req.prompt if self.settings.allow_raw_prompts else Prompt.data(req.prompt)), None
        enc = self.engine.encode(tgt, dps)
        if len(enc.target) > self.limits.max_prompt_tokens:
            raise InputError(f"the prompt has {len(enc.target)} tokens; this server accepts "
                             f"{self.limits.max_prompt_tokens}", fix="shorten the prompt (the limit is --max-prompt-tokens)")
        return enc


RESPONSES = {s: {"description": d} for s, d in (
    (400, "bad request"), (401, "missing or wrong API key"), (403, "forbidden by the operator's delta policy"),
    (413, "body too large"), (429, "queue full"), (500, "llama.cpp failed"), (503, "a delta failed"),
    (504, "time limit"))}
RESPONSES[200] = {"description": 'the completion; with "stream": true, server-sent events',
                  "content": {"application/json": {}, "text/event-stream": {}}}

async def models(request: Request):
    st: ServerState = request.app.state.cmc
    return {"object": "list", "data": [{"id": st.settings.model_name, "object": "model", "owned_by": "cmc-edge",
                                        "deltas": [p.describe() for p in st.policies]}]}


async def completions(req: CompletionRequest, request: Request):
    return await complete(request.app.state.cmc, req, request, chat=False)


async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await complete(request.app.state.cmc, req, request, chat=True)


async def complete(st: ServerState, req, request: Request, chat: bool):
    """Check the request, wait for the engine, and answer whole or as server-sent events. Every
    check (policy, length, queue) and the first chunk come before the 200."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    deadline = time.monotonic() + st.limits.request_timeout_s
    try:
        params, alphas = st.sampling(req, chat), st.alphas(req)
        enc = await run_in_threadpool(st.encode, req, chat)
        job = await st.runner.submit(enc, params, alphas=alphas, deadline=deadline, whole=st.whole)
    except CmcError as exc:
        return error_response(exc)
    head = {"id": rid, "created": created, "model": st.settings.model_name}
    if req.stream:
        kind, first = await job.next()
        if kind == "error":
            return error_response(first)
        return StreamingResponse(sse_events(job, head, chat, kind, first), media_type="text/event-stream")

    watcher = asyncio.ensure_future(cancel_on_disconnect(request, job))
    text = []
    try:
        while True:
            kind, val = await job.next()
            if kind == "chunk":
                text.append(val)
            elif kind == "error":
                return error_response(val)
            else:
                gen = val
                break
    finally:
        watcher.cancel()
        job.cancel.set()
    usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.tokens),
             "total_tokens": gen.prompt_tokens + len(gen.tokens)}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": gen.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    return {**head, "object": "text_completion", "usage": usage,
            "choices": [{"index": 0, "text": "".join(text), "finish_reason": gen.finish_reason, "logprobs": None}]}


async def cancel_on_disconnect(request: Request, job) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.cancel.set()
            return


def chunk_obj(head: dict, chat: bool, text=None, finish=None, role=False) -> dict:
    if chat:
        delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
        return {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


async def sse_events(job, head: dict, chat: bool, kind: str, val):
    """The stream from its first event on; a later failure is an SSE error event. However it ends
    (the client gone included), the generation is told to stop."""
    try:
        if chat:
            yield f"data: {json.dumps(chunk_obj(head, chat, role=True))}\n\n"
        while True:
            if kind == "chunk":
                yield f"data: {json.dumps(chunk_obj(head, chat, val))}\n\n"
            elif kind == "end":
                yield f"data: {json.dumps(chunk_obj(head, chat, finish=val.finish_reason))}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                status, etype = error_status(val)
                msg = str(val) if isinstance(val, CmcError) else "internal error (see the server's log)"
                yield f"data: {json.dumps(error_body(status, msg, etype))}\n\n"
                return
            kind, val = await job.next()
    finally:
        job.cancel.set()


async def invalid_request(_request, exc: RequestValidationError):
    """A body that fails its model: HTTP 400 naming the field (a union field fails once per member,
    "stop" as a string and as a list: the field itself is named)."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    locs = [tuple(e.get("loc", ())) for e in errs if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    common = locs[0] if locs else ()
    for loc in locs[1:]:
        n = 0
        while n < min(len(common), len(loc)) and common[n] == loc[n]:
            n += 1
        common = common[:n]
    param = ".".join(str(x) for x in common if x != "body") or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
    if len(errs) > 1:
        message += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
    return JSONResponse(error_body(400, message, "invalid_request_error", param), status_code=400)


async def http_error(_request, exc: HTTPException):
    return JSONResponse(error_body(exc.status_code, str(exc.detail), "invalid_request_error"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def crashed(_request, exc: Exception):
    log.exception("request failed")
    return error_response(exc)


def create_app(engine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI app over ``engine`` (see the module docstring)."""
    app = FastAPI(title="cmc-edge", version="1", description=__doc__.split("\n\n")[0])
    app.state.cmc = ServerState(engine, settings)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=RESPONSES)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=RESPONSES)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.limits.max_body_bytes)
    return app


def serve(engine, settings: ServerSettings) -> int:
    """Serve ``engine`` until interrupted (uvicorn); then stop the running generation and close the engine."""
    import uvicorn

    try:
        app = create_app(engine, settings)
        try:
            uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
        finally:
            app.state.cmc.runner.close()
    finally:
        engine.close()
    return 0
