"""The delta model at decode time: an onnxruntime session plus its KV cache (numpy + onnxruntime, no torch).

``feed`` runs new token ids on top of the cache and returns the final hidden state of the last
one (the delta's logits are ``delta.head.logits(h)``, see :mod:`cmc_edge.runtime.shift`);
``rollback`` truncates the cache (no recompute) when the delta's tokenization of the generated
text is re-segmented; ``reset`` empties it. The cache stays in onnxruntime's own buffers
(``OrtValue``s, on the session's device). With a graph whose cache may be shared
(``OnnxSpec.kv_cache == "shared"``, the fused GroupQueryAttention graph) each cache tensor is one
buffer of ``max_positions`` rows, bound as both past input and present output: a step writes its
new rows in place, and a rollback only moves ``n_past``. Otherwise (``"concat"``) the
``present_*`` outputs of one step are bound as the ``past_*`` inputs of the next, and a rollback
slices them.

>>> from cmc_edge.runtime.bundle import load_bundle                     # doctest: +SKIP
>>> delta = OnnxDelta(load_bundle("bundle/"), variant="int8")           # doctest: +SKIP
>>> h = delta.feed([12, 345, 6]); h.shape, delta.head.logits(h).shape, delta.n_past   # doctest: +SKIP
((256,), (49152,), 3)
>>> delta.rollback(2); _ = delta.feed([7])                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from cmc_edge.errors import ArtifactError, DeltaFault, InputError
from cmc_edge.runtime.bundle import Bundle, OnnxSpec
from cmc_edge.runtime.shift import DeltaHead

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxDelta:
    """One delta session with its KV cache. Not thread-safe: one generation at a time."""

    def __init__(self, bundle: Bundle, variant: Literal["fp32", "int8"] | None = None,
                 providers: list[str] | None = None, threads: int = 1, head: DeltaHead | None = None):
        """``variant`` None: the bundle's default (INT8 where it has one, see ``Bundle.default_variant``)."""
        self.variant = variant or bundle.default_variant
        head = head or DeltaHead(bundle.load_embedding(), bundle.load_groups())
        self._setup(bundle.model_path(self.variant), bundle.onnx, head, providers, threads)

    @classmethod
    def from_file(cls, onnx_path: str | Path, spec: OnnxSpec, head: DeltaHead, *,
                  providers: list[str] | None = None, threads: int = 1) -> "OnnxDelta":
        """A session on a bare graph file (the exporter validates with this before the bundle exists)."""
        self = cls.__new__(cls)
        self._setup(Path(onnx_path), spec, head, providers, threads)
        self.variant = None                  # a bare file: no variant name
        return self

    def _setup(self, path: Path, spec: OnnxSpec, head: DeltaHead, providers: list[str] | None,
               threads: int) -> None:
        import onnxruntime as ort

        if not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}", fix="e.g. --threads 1")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The delta runs beside llama.cpp; spinning worker threads would steal its cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or default_providers())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ArtifactError(f"onnxruntime cannot load the delta graph {path}: {exc}",
                                fix="re-export the bundle, or check that onnxruntime is >= 1.18") from exc
        ins = tuple(i.name for i in self.session.get_inputs())
        outs = tuple(o.name for o in self.session.get_outputs())
        if set(ins) != set(spec.input_names) or set(outs) != set(spec.output_names):
            raise ArtifactError(f"the delta graph {path} has inputs {list(ins)} and outputs {list(outs)}, "
                                "not the ones its manifest declares",
                                fix="re-export the bundle with `cmc-edge export`")
        if (head.vocab_size, head.hidden_size) != (spec.vocab_size, spec.hidden_size):
            raise ArtifactError(f"the delta's embedding is {head.vocab_size} x {head.hidden_size}, its graph expects "
                                f"{spec.vocab_size} x {spec.hidden_size}", fix="re-export the bundle with `cmc-edge export`")
        self.spec = spec
        self.head = head
        self.path = path
        self.max_positions = spec.max_positions
        self.providers = self.session.get_providers()
        self._device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.shared_cache = spec.kv_cache == "shared"
        if self.shared_cache and self._device == "cuda":
            log.warning("%s uses GroupQueryAttention, which onnxruntime's CUDA provider runs in half precision "
                        "only: its attention runs on the CPU. For the CUDA provider, export with --graph fused-mha",
                        path)
        self._binding = self.session.io_binding()
        self._buffers = None                 # the shared cache, allocated on first use
        self._step_io = None                 # the single-token binding over it (see _step)
        self.reset()

    def fork(self) -> "OnnxDelta":
        """Another cache on the same onnxruntime session (its graph and weights shared): one per
        sequence when several generations run side by side. Starts empty."""
        other = copy.copy(self)
        other._binding = self.session.io_binding()
        other._buffers = other._step_io = None
        other.reset()
        return other

    # -- state -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Tokens in the KV cache (= the position of the next token)."""
        return self._n_past

    def reset(self) -> None:
        """Empty the cache."""
        import onnxruntime as ort

        s = self.spec
        self._n_past = 0
        if self.shared_cache:
            if self._buffers is None:        # stale rows past n_past are never read
                shape = (1, s.num_kv_heads, s.max_positions, s.head_dim)                  # (1, H, P, Dh)
                # one array each: on the CPU an OrtValue wraps the numpy memory it is given
                self._buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), self._device, 0)
                                 for _ in s.past_names]
            self._past = self._buffers
            return
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype=np.float32)    # (1, H, 0, Dh)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0) for _ in s.past_names]

    def rollback(self, n_past: int) -> None:
        """Keep only the first ``n_past`` cached tokens (no recompute)."""
        import onnxruntime as ort

        if not 0 <= n_past <= self._n_past:
            raise InputError(f"cannot roll the delta back to {n_past} tokens: it holds {self._n_past}",
                             fix="roll back to a length between 0 and n_past")
        if n_past == self._n_past:
            return
        if n_past == 0:
            self.reset()
            return
        if self.shared_cache:                # rows past n_past are overwritten before they are read
            self._n_past = n_past
            return
        self._past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n_past]),
                                                       self._device, 0)                 # (1, H, n, Dh)
                      for v in self._past]
        self._n_past = n_past

    # -- stepping ----------------------------------------------------------------------------
    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after the cached tokens; return the last position's hidden state (d,) float32."""
        hidden = self._run(ids)                                                          # (S, d)
        return hidden[-1] if len(hidden) == 1 else hidden[-1].copy()                    # (d,)

    def feed_all(self, ids: Sequence[int]) -> np.ndarray:
        """Like :meth:`feed` but return every new position's full logits (S, V) (validation, scoring)."""
        return self.head.logits(self._run(ids))

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        s = self.spec
        input_ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                       # (1, S)
        n_new = input_ids.shape[1]
        if n_new == 0:
            raise InputError("feed() needs at least one token id", fix="pass a non-empty list of ids")
        if input_ids.min() < 0 or input_ids.max() >= s.vocab_size:
            raise InputError(f"token id out of range for the delta vocabulary of {s.vocab_size}",
                             fix="encode text with the bundle's own tokenizer")
        if self._n_past + n_new > self.max_positions:
            raise InputError(f"the delta holds at most {self.max_positions} positions; {self._n_past} are cached "
                             f"and {n_new} more were fed",
                             fix="roll back or reset the delta (the decode loop slides its window)")
        try:
            if self.shared_cache and n_new == 1:
                hidden, out = self._step(int(input_ids[0, 0])), None                     # (1, d)
            else:
                out = self._bind_and_run(input_ids)
                hidden = out[0].numpy()[0]                                                # (S, d)
        except Exception as exc:  # noqa: BLE001 - any runtime failure stops generation
            raise DeltaFault(f"the delta session failed at position {self._n_past}: {exc}",
                             fix="check the bundle with `cmc-edge inspect`") from exc
        if not np.isfinite(hidden).all():
            raise DeltaFault(f"the delta produced non-finite logits at position {self._n_past + n_new - 1}",
                             fix="re-export the bundle; check it with `cmc-edge inspect`")
        if not self.shared_cache:
            self._past = list(out[1:])
        self._n_past += n_new
        return hidden

    def _bind_and_run(self, input_ids: np.ndarray) -> list:
        """Any number of new tokens: bind this call's inputs and outputs, run. -> the outputs"""
        s, n_new = self.spec, input_ids.shape[1]
        position_ids = np.arange(self._n_past, self._n_past + n_new, dtype=np.int64)[None]  # (1, S)
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(s.input_names[0], self.head.embed(input_ids))                   # (1, S, d)
        b.bind_cpu_input(s.input_names[1], position_ids)
        for name, value in zip(s.past_names, self._past):
            b.bind_ortvalue_input(name, value)
        b.bind_output(s.output_names[0], "cpu")           # outputs come back in binding order
        for name, buf in zip(s.present_names, self._past):
            if self.shared_cache:
                b.bind_ortvalue_output(name, buf)         # in place: the same buffer as the past
            else:
                b.bind_output(name, self._device)
        self.session.run_with_iobinding(b)
        return b.get_outputs()

    def _step(self, token: int) -> np.ndarray:
        """One new token on a shared cache (the decode loop's call): every input and output stays
        bound between steps, to arrays written in place; ~45 us less than binding anew. -> (1, d)"""
        import onnxruntime as ort

        if self._step_io is None:
            s = self.spec
            emb = np.zeros((1, 1, s.hidden_size), np.float32)                            # (1, 1, d)
            pos = np.zeros((1, 1), np.int64)                                              # (1, 1)
            hid = np.zeros((1, 1, s.hidden_size), np.float32)                            # (1, 1, d)
            values = [ort.OrtValue.ortvalue_from_numpy(x) for x in (emb, pos, hid)]      # CPU: they wrap the arrays
            b = self.session.io_binding()
            b.bind_ortvalue_input(s.input_names[0], values[0])
            b.bind_ortvalue_input(s.input_names[1], values[1])
            b.bind_ortvalue_output(s.output_names[0], values[2])
            for past, present, buf in zip(s.past_names, s.present_names, self._buffers):
                b.bind_ortvalue_input(past, buf)
                b.bind_ortvalue_output(present, buf)
            self._step_io = (b, emb, pos, hid, values)
        b, emb, pos, hid, _ = self._step_io
        emb[0, 0] = self.head.embed(token)                                                # the same lookup as prefill
        pos[0, 0] = self._n_past
        self.session.run_with_iobinding(b)
        return hid[0].copy()
