"""Shared fixtures: a tiny real GGUF written by the test session, and the packaged real models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (tiny_gguf, tiny_checkpoint) live beside the tests


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from tiny_gguf import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token maps and assembled models go to a per-session cache, never the user's."""
    import os

    home = tmp_path_factory.mktemp("cmc-home")
    old = os.environ.get("CMC_EDGE_HOME")
    # Keep the assembled Gemma file shared across sessions (it is verified by checksum).
    models = Path.home() / ".cache" / "cmc-edge" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    os.environ["CMC_EDGE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("CMC_EDGE_HOME", None)
    else:
        os.environ["CMC_EDGE_HOME"] = old


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from cmc_edge.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    from cmc_edge.models import gemma3_path

    return gemma3_path()
