"""The engine's state of one request (loop thread only), shared by the engine and its KV layouts."""

from __future__ import annotations

from services.inference.processors import TokenSampler
from services.inference.prompt_adapters import virtual_tokens
from services.inference.requests import GenerationRequest, RequestHandle, TokenLogprob

BASE_KEY = ""
"""Waiting-queue and prefix-cache key of base-model requests (adapters use their ref)."""


class Seq:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, request: GenerationRequest, stop_ids: frozenset[int]) -> None:
        self.handle = handle
        self.prompt = [int(t) for t in request.prompt_ids]
        self.adapter = request.adapter
        self.key = request.adapter.ref if request.adapter is not None else BASE_KEY
        self.virtual = virtual_tokens(request.adapter)  # prompt adapters' tokens in front of the prompt
        self.max_new_tokens = request.params.new_tokens
        self.stop_ids = stop_ids
        self.stop_check = request.stop_check
        self.sampler = TokenSampler(request.params)
        self.logprobs = request.params.logprobs
        self.prompt_logprobs_k = request.params.prompt_logprobs
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # set at prefill when asked
        self.generated: list[int] = []
        self.slot = -1
        self.slot_held = False
        self.cancelled = False
        self.length = 0  # tokens in the KV cache for this row (virtual tokens included)
        self.last_token_at = 0.0
        self.admitted_at = 0.0
        # Paged KV cache (``paged_batch``): the row's blocks, the tokens it still has to prefill
        # (its prompt; after a preemption its prompt and generated tokens), and the prompt
        # logprobs gathered chunk by chunk.
        self.table: list[int] = []
        self.feed: list[int] = []
        self.fed = 0  # tokens of ``feed`` in the cache
        self.partial_logprobs: list[TokenLogprob] = []
        self.prompt_hashes: list[bytes] | None = None  # the prompt's full blocks' prefix-cache keys

    @property
    def all_ids(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def prefilling(self) -> bool:
        """Still has prompt tokens to put in the cache before it can decode."""
        return self.fed < len(self.feed)
