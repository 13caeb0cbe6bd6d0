"""The decoder: logits -> next tokens. Greedy, or temperature / top-k / top-p sampling.

Each sampling request draws from its own generator, seeded from ``SamplingParams.seed`` (or from
the decoder's seed and the request id), so a request's draws do not depend on which other
requests shared its batches, and preemption does not change what it samples.
"""

from __future__ import annotations

import torch

from engine.request import Request


class Decoder:
    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[int, torch.Generator] = {}

    def decode(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """``logits`` [len(requests), vocab] -> one token id per request (waits for them)."""
        return self.sample(requests, logits).tolist()

    def sample(
        self, requests: list[Request], logits: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits`` [len(requests), vocab] -> token ids [len(requests)] int64 on the logits'
        device, without waiting for the device: the overlap scheduler reads them a step later.
        ``out``: an int64 buffer of that size on the same device to write them into."""
        if logits.shape[0] != len(requests):
            raise ValueError(
                f"decoder got {logits.shape[0]} logits rows for {len(requests)} requests"
            )
        tokens = torch.argmax(logits, dim=-1, out=out)
        for i, request in enumerate(requests):
            if not request.sampling_params.is_greedy:
                tokens[i] = self._sample(request, logits[i])
        return tokens

    def release(self, request: Request) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(id(request), None)

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        generator = self._generators.get(id(request))
        if generator is None:
            seed = request.sampling_params.seed
            if seed is None:
                seed = self.seed * 1_000_003 + request.request_id
            generator = torch.Generator(device=device).manual_seed(seed)
            self._generators[id(request)] = generator
        return generator

    def _sample(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        params = request.sampling_params
        scores = logits.float() / params.temperature
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # Drop a token when the ones ranked above it already cover top_p (the first stays).
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator(request, probs.device))[0]
