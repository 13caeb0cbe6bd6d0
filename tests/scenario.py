"""Hand-built scheduling scenarios: emulate the executor's bookkeeping without a model."""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache import KVCacheManager
from engine.request import Request, SamplingParams
from engine.scheduler import SchedulerOutput

NEXT_TOKEN = 7  # token "sampled" by the fake steps


def make_request(
    request_id: int, prompt: int | Sequence[int], max_new_tokens: int = 8, arrival_time: float = 0.0
) -> Request:
    """``prompt``: a length (tokens 100 + request_id * 1000 + i, unique per request) or the ids."""
    if isinstance(prompt, int):
        prompt = [100 + request_id * 1000 + i for i in range(prompt)]
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return Request(request_id, list(prompt), params, arrival_time=arrival_time)


def run_step(kv: KVCacheManager, batch: SchedulerOutput) -> None:
    """What the executor does around the forward for ``batch``."""
    for request in batch.context_requests:
        if request.is_pending:
            request.start(0.0)
    kv.prepare_resources(batch)
    sampling = batch.sampling_requests
    for request in batch.context_requests:
        request.num_computed_tokens += request.context_chunk_size
    for request in batch.generation_requests:
        request.num_computed_tokens += 1
    for request in sampling:
        request.append_token(NEXT_TOKEN, 0.0)
    kv.update_resources(batch)


def prefill(kv: KVCacheManager, requests: Sequence[Request]) -> None:
    """Run each request's whole context in one step; each then generates."""
    for request in requests:
        request.context_chunk_size = request.num_remaining_context_tokens
    run_step(kv, SchedulerOutput(context_requests=list(requests)))


def decode(kv: KVCacheManager, requests: Sequence[Request], num_steps: int = 1) -> None:
    for _ in range(num_steps):
        run_step(kv, SchedulerOutput(generation_requests=list(requests)))
