"""How many rows a step's dense layers run on in the real engine: its tokens, padded to a bucket.

The real engine on CUDA replays captured graphs, each for a fixed number of rows, so a step
runs in the smallest bucket that holds it and its GEMMs pay for the padding::

    decode-only step   R sequences -> smallest CUDA-graph batch size >= R  (1, 2, 4, ..., 256)
    step with prompts  T tokens    -> smallest piecewise token size >= T   (16, 32, ..., 8192)
    anything larger, or eager      -> its own tokens

A mixed step of 255 decodes and a 1,000-token chunk (1,255 tokens) runs its GEMMs on 2,048 rows:
up to 2x the work its tokens alone suggest. That is the ``num_padded_tokens`` feature of the cost
model (``engine.sim.cost_model.StepFeatures``): the real engine records the bucket it ran
(``IterationStats.num_padded_tokens``); the simulator pads with ``StepPadding`` as the engine it
simulates would.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.cuda_graphs import default_cuda_graph_batch_sizes
from engine.piecewise_graphs import default_piecewise_token_sizes


@dataclass(frozen=True)
class StepPadding:
    """Bucket sizes of decode-only steps (``decode_sizes``: CUDA-graph batch sizes) and of steps
    with prompt tokens (``token_sizes``: piecewise token sizes), each sorted; empty: eager."""

    decode_sizes: tuple[int, ...] = ()
    token_sizes: tuple[int, ...] = ()

    def padded(self, num_tokens: int, is_decode_only: bool) -> int:
        """The rows a step of ``num_tokens`` tokens runs its dense layers on."""
        sizes = self.decode_sizes if is_decode_only else self.token_sizes
        i = bisect_left(sizes, num_tokens)
        return sizes[i] if i < len(sizes) else num_tokens

    @classmethod
    def of_engine(
        cls,
        *,
        max_batch_size: int | None,
        max_num_tokens: int | None,
        enforce_eager: bool = False,
        cuda_graph_batch_sizes: Sequence[int] | None = None,
        piecewise_cuda_graphs: bool | None = None,
        piecewise_token_sizes: Sequence[int] | None = None,
        full_cuda_graphs: bool = False,
    ) -> StepPadding:
        """The buckets ``engine.llm.LLM`` captures on CUDA with the Triton attention backend (how
        the profiles' engines run) for these settings, named as ``LLM``'s arguments (full CUDA
        graphs capture the same token buckets as the pieces)."""
        if enforce_eager:
            return cls()
        decode = cuda_graph_batch_sizes or (
            default_cuda_graph_batch_sizes(max_batch_size) if max_batch_size else ()
        )
        tokens: Sequence[int] = ()
        if piecewise_cuda_graphs is not False:  # None: where they can, which is here
            tokens = piecewise_token_sizes or (
                default_piecewise_token_sizes(max_num_tokens) if max_num_tokens else ()
            )
        return cls(tuple(sorted(set(decode))), tuple(sorted(set(tokens))))

    @classmethod
    def of_profile(cls, engine: Mapping[str, Any]) -> StepPadding:
        """The buckets of the engine a profile was made with (its ``engine`` field): profiles
        made before piecewise graphs existed (the H100 ones) ran prompt steps eagerly."""
        return cls.of_engine(
            max_batch_size=engine.get("max_batch_size"),
            max_num_tokens=engine.get("max_num_tokens"),
            enforce_eager=not engine.get("cuda_graphs", False),
            cuda_graph_batch_sizes=engine.get("cuda_graph_batch_sizes"),
            piecewise_cuda_graphs=bool(engine.get("piecewise_cuda_graphs", False)),
            piecewise_token_sizes=engine.get("piecewise_token_sizes"),
        )
