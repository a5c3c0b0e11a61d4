"""The decode loop: draft, verify, accept, fix the caches, for one sequence.

Plain autoregressive decoding is the same loop with no drafter (an empty draft every step), so the
baseline runs through exactly the same runner and verifier as speculative decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.runner import ModelRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.verify import Verifier


def decode(
    target: ModelRunner,
    drafter: Drafter | None,
    verifier: Verifier,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    gamma: int,
    sampling: SamplingConfig,
    stop_token_ids: frozenset[int],
    generator: torch.Generator | None,
    stats: DecodeStats,
) -> Iterator[list[int]]:
    """Yield the tokens committed by each target forward until a stop token or `max_new_tokens`.

    Invariant between steps: the target's cache holds every committed token but the newest one, which
    the next forward feeds together with the draft.
    """
    if len(prompt_ids) + max_new_tokens > target.max_length:
        raise InvalidRequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"target's context of {target.max_length} tokens"
        )
    start = time.perf_counter()
    stats.prompt_tokens = len(prompt_ids)
    target.reset()
    prompt_logits = target.forward(torch.tensor(prompt_ids, dtype=torch.int64), num_logits=1)  # [1, V]
    verdict = verifier(Draft.empty(), prompt_logits, generator)
    stats.prefill_s = time.perf_counter() - start
    stats.record_step(drafted=0, accepted=0)
    context = list(prompt_ids)
    new_tokens = [verdict.next_token]
    while True:
        new_tokens = _through_first_stop(new_tokens, stop_token_ids)
        context.extend(new_tokens)
        stats.new_tokens += len(new_tokens)
        stats.wall_s = time.perf_counter() - start
        yield new_tokens
        remaining = max_new_tokens - stats.new_tokens
        if remaining <= 0 or new_tokens[-1] in stop_token_ids:
            return

        # Draft at most remaining - 1 tokens: the target always adds one of its own.
        max_draft = min(gamma, remaining - 1)
        draft = drafter.propose(context, max_draft, sampling, generator) if drafter else Draft.empty()
        # One target forward scores the newest committed token and the draft: row i of target_logits
        # is the target's distribution for the token after input i.
        step_input = torch.cat([torch.tensor([context[-1]], dtype=torch.int64), draft.tokens])
        target_logits = target.forward(step_input, num_logits=len(draft) + 1)  # [k+1, V]
        verdict = verifier(draft, target_logits, generator)
        target.rollback(len(context) + verdict.accepted_len)  # drop the rejected draft tokens
        stats.record_step(drafted=len(draft), accepted=verdict.accepted_len)
        new_tokens = [*draft.tokens[: verdict.accepted_len].tolist(), verdict.next_token]


def _through_first_stop(tokens: list[int], stop_token_ids: frozenset[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_token_ids:
            return tokens[: i + 1]
    return tokens
