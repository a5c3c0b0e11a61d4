"""The decode loop: speculate a token tree, verify it in one target forward, keep the accepted path.

A chain of drafted tokens is a tree with one branch; plain autoregressive decoding is the same loop with
no speculation (a tree that is just the root), so the baseline runs through exactly the same runner and
verifier as speculative decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.policy import SpeculationPolicy
from swarmspec.runners.base import ModelRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import Speculation
from swarmspec.tree import TokenTree
from swarmspec.verify import Verifier


def decode(
    target: ModelRunner,
    speculation: Speculation,
    verifier: Verifier,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    policy: SpeculationPolicy,
    sampling: SamplingConfig,
    stop_token_ids: frozenset[int],
    generator: torch.Generator | None,
    stats: DecodeStats,
) -> Iterator[list[int]]:
    """Yield the tokens committed by each target forward until a stop token or `max_new_tokens`.

    Invariant between steps: the target's cache holds every committed token but the newest one, which
    the next forward feeds as the root of the tree. `policy` chooses how deep the drafters propose and
    which of their nodes the target verifies.
    """
    check_fits(len(prompt_ids), max_new_tokens, target.max_length)
    start = time.perf_counter()
    stats.prompt_tokens = len(prompt_ids)
    speculation.begin(prompt_ids)
    policy.begin()
    try:  # `end` also runs when the consumer stops early (a stop string) and closes this generator
        target.reset()
        prompt_logits = target.forward(torch.tensor(prompt_ids, dtype=torch.int64), num_logits=1)  # [1, V]
        tree = TokenTree.chain(prompt_ids[-1], torch.empty(0, dtype=torch.int64))
        verdict = verifier(tree, prompt_logits, generator)
        stats.prefill_s = time.perf_counter() - start
        stats.record_step(drafted=0, committed=1)
        new_tokens = [verdict.next_token]
        speculation.observe(tree, [], new_tokens)
        context = list(prompt_ids)
        while True:
            context.extend(new_tokens)
            stats.wall_s = time.perf_counter() - start
            yield new_tokens
            remaining = max_new_tokens - stats.new_tokens
            if remaining <= 0 or new_tokens[-1] in stop_token_ids:
                return

            # Speculate at most remaining - 1 tokens deep: the target always adds one of its own.
            depths = policy.draft_depths(remaining - 1)
            tree = policy.select(speculation.speculate(context, depths, sampling, generator))
            # One target forward scores every node: row i of target_logits is the target's distribution
            # for the token after node i (the root, context[-1], is node 0).
            tree_mask = None if tree.is_chain else tree.ancestor_mask()
            target_logits = target.forward(tree.tokens, num_logits=len(tree), tree_mask=tree_mask)  # [n, V]
            verdict = verifier(tree, target_logits, generator)
            # Keep the root and the accepted path in the cache; drop every other branch.
            root_position = len(context) - 1
            target.compact(len(context), [root_position + node for node in verdict.path])
            # Nothing after a stop token is output, nor counted.
            new_tokens = through_first_stop(
                [*tree.tokens[verdict.path].tolist(), verdict.next_token], stop_token_ids
            )
            proposers = [] if tree.proposers is None else [tree.proposers[node] for node in verdict.path]
            stats.record_step(len(tree) - 1, len(new_tokens), accepted_by=proposers, depth=tree.depth)
            policy.observe(tree, verdict.path, verdict.next_token)
            speculation.observe(tree, verdict.path, new_tokens)
    finally:
        target.end()
        policy.end()
        speculation.end()


def check_fits(prompt_tokens: int, max_new_tokens: int, max_length: int) -> None:
    """A request must fit the target's context whole: refused up front, never cut short."""
    if prompt_tokens + max_new_tokens > max_length:
        raise InvalidRequestError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"target's context of {max_length} tokens"
        )


def through_first_stop(tokens: list[int], stop_token_ids: frozenset[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_token_ids:
            return tokens[: i + 1]
    return tokens
