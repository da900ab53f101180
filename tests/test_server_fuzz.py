"""Fuzz the server from its own OpenAPI schema with Schemathesis: valid and invalid bodies on every
endpoint, against a live server (tiny GGUF, an enforced filter and an optional delta). Whatever
comes in: never a 5xx, and every error is an OpenAI-style JSON body.

Bounded for CI: ``max_examples`` per endpoint and mode (100, hypothesis' default run) and a tiny
``max_tokens`` limit keep it near 15 s; raise ``CMC_FUZZ_EXAMPLES`` for a longer hunt (500: ~1 min).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
pytest.importorskip("torch")  # the tiny bundle is exported with torch

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi import checks as oas_checks  # noqa: E402
from test_server import LiveServer  # noqa: E402

EXAMPLES = int(os.environ.get("CMC_FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def live(tiny_gguf, tmp_path_factory):
    from tiny_checkpoint import make_tiny_bundle

    from cmc_edge.runtime.engine import Delta, Engine
    from cmc_edge.runtime.server import ServerLimits, ServerSettings, create_app
    from cmc_edge.runtime.target import TargetLLM

    root = tmp_path_factory.mktemp("fuzz")
    optional = make_tiny_bundle(root / "json")
    filt = root / "filter"
    shutil.copytree(optional, filt)
    manifest = json.loads((filt / "manifest.json").read_text())
    manifest["objective"] = "unlearn-gd"
    (filt / "manifest.json").write_text(json.dumps(manifest))
    target = TargetLLM(tiny_gguf, n_ctx=512, n_threads=1)
    engine = Engine(target, [Delta(filt, target), Delta(optional, target)])
    limits = ServerLimits(max_tokens=4, max_prompt_tokens=256, max_body_bytes=64 << 10, request_timeout_s=20)
    with LiveServer(create_app(engine, ServerSettings(model_name="tiny", limits=limits))) as server:
        yield server


def errors_are_json(response) -> None:
    """Every 4xx/5xx body is {"error": {"message": ..., "type": ...}}."""
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]
        err = json.loads(response.text)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def operations(live):
    schema = schemathesis.openapi.from_url(live.url.removesuffix("/v1") + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_get_a_5xx_or_a_non_json_error(live, mode):
    """Schemathesis' pytest plugin does not load under pytest 9, so its strategies are driven with
    hypothesis directly, one run per operation: positive (schema-valid) and negative bodies."""
    ops = operations(live)
    assert {op.path for op in ops} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}
    for op in ops:
        if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue                          # no parameters, no body: nothing to make invalid
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(timeout=30)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: " \
                                               f"{response.text[:300]}"
            errors_are_json(response)
            # Schema-valid bodies may still be refused (max_tokens over this server's limit, an unknown
            # delta name, the enforced filter switched off): positive_data_acceptance does not apply.
            excluded = [oas_checks.positive_data_acceptance]
            if response.status_code == 413:        # a body over the server's limit is refused before validation
                excluded.append(oas_checks.negative_data_rejection)
            case.validate_response(response, excluded_checks=excluded)

        run()
