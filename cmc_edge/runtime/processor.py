"""CMC as a stock llama-cpp-python ``logits_processor``, for code that already calls ``create_completion``.

llama-cpp-python calls a processor from a ctypes callback and *swallows* exceptions raised in it,
so a plain processor that fails would let generation continue unfiltered. This one fails closed:
on any error it stores the error and forces end-of-generation (every logit -inf except EOS), so
no token is sampled without the delta; call :meth:`CMCLogitsProcessor.raise_if_failed` afterwards.

    proc = CMCLogitsProcessor(target, [delta], prompt_tokens=len(tokens), delta_prompts=[prompt])
    out = target.llm.create_completion(prompt, logits_processor=LogitsProcessorList([proc]))
    proc.raise_if_failed()

Note: llama-cpp-python drops a processor when ``logit_bias`` is also passed; do not combine them.
The :class:`~cmc_edge.runtime.engine.Engine` loop is faster (no strided copy) and preferred.
"""

from __future__ import annotations

import numpy as np

from cmc_edge.errors import DeltaFault


class CMCLogitsProcessor:
    def __init__(self, target, deltas, *, prompt_tokens: int, delta_prompts, alphas=None):
        self.target = target
        self.deltas = list(deltas)
        self.alphas = [d.alpha for d in self.deltas] if alphas is None else list(alphas)
        self.prompt_tokens = prompt_tokens
        self.trackers = [d.tracker(p) for d, p in zip(self.deltas, delta_prompts)]
        self.eos = int(target.llm.token_eos())
        self.error: BaseException | None = None
        self.calls = 0

    def reset(self, delta_prompts) -> None:
        self.trackers = [d.tracker(p) for d, p in zip(self.deltas, delta_prompts)]
        self.error = None
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.error is not None:
            return self._stop(scores)
        try:
            gen = b"".join(self.target.piece(int(t)) for t in input_ids[self.prompt_tokens:])
            for d, a, tr in zip(self.deltas, self.alphas, self.trackers):
                h = tr.state_for(gen)
                if not np.isfinite(h.sum(dtype=np.float64)):
                    raise DeltaFault(f"delta {d.name} produced non-finite logits", fix="re-export the bundle")
                d.mapped.shift_full(h, a, scores)
            return scores
        except BaseException as exc:  # noqa: BLE001 - ctypes would swallow it: record and stop instead
            self.error = exc
            return self._stop(scores)

    def _stop(self, scores):
        scores[:] = -np.inf
        scores[self.eos] = 0.0
        return scores

    def raise_if_failed(self) -> None:
        if self.error is not None:
            if isinstance(self.error, DeltaFault):
                raise self.error
            raise DeltaFault(f"the delta failed during generation: {self.error!r}",
                             fix="check the bundle and token map; generation was stopped") from self.error
