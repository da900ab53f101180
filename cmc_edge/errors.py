"""Typed errors. Every error says what is wrong and how to fix it.

>>> str(CmcError("the map is stale", fix="rebuild it with `cmc-edge map`"))
'the map is stale. Fix: rebuild it with `cmc-edge map`'
"""

from __future__ import annotations


class CmcError(Exception):
    """Base error: ``problem`` plus an actionable ``fix``. The CLI prints it and exits 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        end = "" if problem.endswith((".", "!", "?")) else "."
        super().__init__(problem if fix is None else f"{problem}{end} Fix: {fix}")


class InputError(CmcError):
    """A user-supplied file or option is missing, malformed or inconsistent."""


class ArtifactError(CmcError):
    """An artifact (bundle, map, checkpoint) is corrupt, foreign, stale or of another version."""


class ExportValidationError(CmcError):
    """The exported ONNX graph does not reproduce PyTorch within the stated tolerance."""

    def __init__(self, problem: str, fix: str | None = None, *, max_abs_diff: float = float("nan"),
                 tolerance: float = float("nan")):
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(problem, fix)


class DeltaFault(CmcError):
    """The delta path failed during generation. Generation stops: a filter never fails open."""

    exit_code = 3


class GenerationTimeout(CmcError):
    """Generation ran past its deadline (the server's per-request timeout) and was stopped."""


class TargetFault(CmcError):
    """llama.cpp failed while evaluating or sampling the target LLM. Generation stops; nothing sampled
    after the failure is emitted."""

    exit_code = 3


class PolicyError(CmcError):
    """A request asked for something the operator's policy forbids (e.g. switching off an enforced filter)."""
