"""A model engine without a model: the next token is a fixed function of the tokens so far.

Because the token depends only on the sequence content, any correct executor produces the same
outputs whatever the scheduling (batching, chunking, preemption, prefix reuse), which makes
schedule-independence checkable at thousands of random configurations a minute.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCacheManager
from engine.model_engine import ModelEngine
from engine.scheduler import SchedulerOutput

EOS = 2


def next_token(token_ids: list[int], vocab_size: int) -> int:
    h = 0
    for t in token_ids[-4:]:
        h = (h * 131 + t) % 1_000_003
    return (h + len(token_ids) * 7) % vocab_size


class FakeModelEngine(ModelEngine):
    def __init__(self, vocab_size: int = 64, max_seq_len: int = 128):
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.num_forward_tokens = 0

    supports_overlap = True

    def forward(
        self,
        batch: SchedulerOutput,
        kv_cache_manager: KVCacheManager,
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = batch.sampling_requests
        logits = torch.zeros(len(rows), self.vocab_size)
        for i, request in enumerate(rows):
            tokens = request.all_token_ids
            if tokens[-1] < 0:  # overlap scheduling: the last token is the previous step's
                assert pending_tokens is not None, f"{request}: a pending token and no tokens"
                tokens[-1] = int(pending_tokens[-1 - tokens[-1]])
            assert min(tokens) >= 0, f"{request}: a pending token before the last one"
            # A context's last chunk sees the whole sequence; so does a generation step.
            logits[i, next_token(tokens, self.vocab_size)] = 1.0
        self.num_forward_tokens += batch.num_tokens
        return logits
