"""TensorRT-LLM's micro-batch scheduler: a batch-size limit and a token budget per step.

Walk the fitting requests in order. A generation request costs one token. Without chunking, a
context costs its whole remaining context and must fit the leftover budget; with chunking, contexts
are collected and then share the leftover budget through the chunking policy. The first request
that does not fit the batch or the budget ends the walk. Contexts whose chunk does not finish the
prompt are placed before those whose chunk does.

One deviation, so that preemption can never strand a request: without chunking, a *paused* request
whose folded context (prompt + generated tokens) outgrew ``max_num_tokens`` is recomputed in
first-come-first-served chunks. Fresh prompts longer than the budget are rejected on arrival.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.request import Request
from engine.scheduler import MicroBatchScheduler
from policies.microbatch.chunking import CHUNKING_POLICIES, ChunkingPolicy, first_come_first_served


class TokenBudgetMicroBatchScheduler(MicroBatchScheduler):
    steady_decode = True  # see the base class: the simulated engine may skip repeated steps

    def __init__(
        self,
        max_batch_size: int = 256,
        max_num_tokens: int | None = 8192,
        chunking: str | ChunkingPolicy | None = None,
        chunk_unit_size: int | None = None,
    ):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(
                "microbatch_scheduler.max_batch_size must be an integer >= 1, "
                f"got {max_batch_size!r}"
            )
        if max_num_tokens is not None and (
            not isinstance(max_num_tokens, int) or max_num_tokens < 1
        ):
            raise ValueError(
                "microbatch_scheduler.max_num_tokens must be an integer >= 1 or None (no budget), "
                f"got {max_num_tokens!r}"
            )
        if chunk_unit_size is not None and (
            not isinstance(chunk_unit_size, int) or chunk_unit_size < 1
        ):
            raise ValueError(
                "microbatch_scheduler.chunk_unit_size must be an integer >= 1 or None "
                f"(= the KV cache's tokens_per_block), got {chunk_unit_size!r}"
            )
        if isinstance(chunking, str):
            key = chunking.lower()
            if key not in CHUNKING_POLICIES:
                raise ValueError(
                    f"microbatch_scheduler.chunking must be one of {sorted(CHUNKING_POLICIES)} or "
                    f"None (no chunking), got {chunking!r}"
                )
            chunking = CHUNKING_POLICIES[key]
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.chunking: ChunkingPolicy | None = chunking
        self.chunk_unit_size = chunk_unit_size

    def reject_reason(self, request: Request) -> str | None:
        budget = self.max_num_tokens
        if self.chunking is None and budget is not None and request.num_prompt_tokens > budget:
            return (
                f"prompt of {request.num_prompt_tokens} tokens exceeds "
                f"microbatch_scheduler.max_num_tokens={budget} and chunking is off"
            )
        return None

    def schedule(
        self, fitting_requests: Sequence[Request], inflight_request_ids: set[int]
    ) -> tuple[list[Request], list[Request]]:
        budget = self.max_num_tokens
        num_tokens = 0
        num_scheduled = 0
        whole_contexts: list[Request] = []
        to_chunk: list[Request] = []
        generation: list[Request] = []
        for request in fitting_requests:
            if request.request_id in inflight_request_ids:
                continue
            if num_scheduled >= self.max_batch_size:
                break
            if request.is_generation:
                if budget is not None and num_tokens + 1 > budget:
                    break
                generation.append(request)
                num_tokens += 1
            elif self.chunking is not None or (budget is not None and request.num_tokens > budget):
                to_chunk.append(request)  # sized below, from what the budget leaves
            else:
                remaining = request.num_remaining_context_tokens
                if budget is not None and num_tokens + remaining > budget:
                    break
                request.context_chunk_size = remaining
                whole_contexts.append(request)
                num_tokens += remaining
            num_scheduled += 1

        chunked: list[Request] = []
        if to_chunk:
            policy = self.chunking or first_come_first_served
            capacity = None if budget is None else budget - num_tokens
            for request, size in zip(
                to_chunk, policy(to_chunk, capacity, self.chunk_unit_size or 1), strict=True
            ):
                request.context_chunk_size = size
                if size > 0:
                    chunked.append(request)
        # Keep fitting order within each group: non-last chunks first, then last chunks.
        scheduled = set(whole_contexts) | set(chunked)
        contexts = [r for r in fitting_requests if r in scheduled]
        non_last = [r for r in contexts if not r.is_last_context_chunk]
        last = [r for r in contexts if r.is_last_context_chunk]
        return non_last + last, generation
