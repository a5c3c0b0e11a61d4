"""Verification: which drafted tokens the target accepts, and the target's own next token.

Pure tensor math: no model, cache or scheduler in here. Vocabulary: *accepted* tokens are the draft
tokens the target keeps (`accepted_len` of them, a prefix of the draft); the *next token* is the one the
target itself contributes after them (a correction when a draft token was rejected, a bonus token when
the whole draft was accepted). Every verification step therefore commits `accepted_len + 1` tokens.

Shape letters: k = draft tokens, V = vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarmspec.sampling import SamplingConfig, logits_to_probs, sample
from swarmspec.tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    """What the target kept of a tree (or chain): the accepted nodes, then its own next token."""

    path: list[int]  # accepted nodes, root's child first (the root itself is committed already)
    next_token: int  # the target's token after the last accepted node

    @property
    def accepted_len(self) -> int:
        """Drafted tokens accepted (the next token is not counted)."""
        return len(self.path)

    @classmethod
    def of_chain(cls, accepted_len: int, next_token: int) -> Verdict:
        """A chain's verdict: nodes 1..accepted_len of `TokenTree.chain`."""
        return cls(list(range(1, accepted_len + 1)), next_token)


def verify_greedy(
    draft_tokens: torch.Tensor,  # [k]
    target_logits: torch.Tensor,  # [k+1, V]; row i scores the token after draft position i-1
) -> Verdict:
    """Accept the longest draft prefix equal to the target's argmax, then take the target's argmax.

    Example: draft [5, 7, 9], target argmaxes [5, 7, 2, 4] -> accepted_len 2, next_token 2.
    """
    target_tokens = target_logits.argmax(dim=-1)  # [k+1]
    k = draft_tokens.shape[0]
    matches = (draft_tokens == target_tokens[:k]).to(torch.int64)  # [k]
    accepted_len = int(matches.cumprod(dim=0).sum())
    return Verdict.of_chain(accepted_len, int(target_tokens[accepted_len]))


def verify_speculative_sampling(
    draft_tokens: torch.Tensor,  # [k]
    draft_probs: torch.Tensor,  # [k, V]; the distribution each draft token was sampled from
    target_probs: torch.Tensor,  # [k+1, V]
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): output ~ target_probs exactly.

    Draft token x_i is accepted with probability min(1, target(x_i) / draft(x_i)). At the first rejection
    the next token is drawn from the residual norm(max(0, target - draft)) at that position; if every
    draft token is accepted, the bonus token is drawn from target_probs[k].
    """
    k = draft_tokens.shape[0]
    positions = torch.arange(k)
    target_p = target_probs[positions, draft_tokens]  # [k]
    draft_p = draft_probs[positions, draft_tokens]  # [k]; > 0 since each token was drawn from it
    uniform = torch.rand(k, generator=generator, dtype=target_p.dtype)  # [k]
    # u < min(1, t/d)  <=>  u * d < t, without dividing by a tiny d.
    accepted = (uniform * draft_p < target_p).to(torch.int64)
    accepted_len = int(accepted.cumprod(dim=0).sum())
    if accepted_len == k:
        return Verdict.of_chain(k, int(sample(target_probs[k], generator)))
    corrected = residual_after_rejection(target_probs[accepted_len], draft_probs[accepted_len])
    return Verdict.of_chain(accepted_len, int(sample(corrected, generator)))


def residual_after_rejection(target_p: torch.Tensor, draft_q: torch.Tensor) -> torch.Tensor:  # [V]
    """norm(max(0, p - q)): what the target distribution leaves once a token drawn from q is rejected."""
    residual = (target_p - draft_q).clamp_min(0.0)
    mass = residual.sum()
    # A rejection implies p(x) < q(x), so the residual has mass; the guard only catches float
    # round-off when p and q are equal up to rounding.
    return residual / mass if mass > 0 else target_p


def verify_tree_greedy(tree: TokenTree, target_logits: torch.Tensor) -> Verdict:  # logits [n, V]
    """From the root, follow the child equal to the target's argmax; stop where no child matches.

    Row i of target_logits is the target's distribution for the token after node i (its ancestors and
    itself read in order), so a chain reduces to `verify_greedy`.
    """
    target_tokens = target_logits.argmax(dim=-1).tolist()  # [n]
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = 0
    while True:
        match = next((c for c in tree.children(node) if tokens[c] == target_tokens[node]), None)
        if match is None:
            return Verdict(path, target_tokens[node])
        path.append(match)
        node = match


def verify_tree_sampling(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [n, V]
    generator: torch.Generator | None,
) -> Verdict:
    """Multi-step speculative sampling (SpecInfer): the output follows target_probs exactly.

    At a node, its children are tried in random order. Child s, sampled from its drafter's distribution
    q_s, is accepted with probability min(1, p(s) / q_s(s)); on rejection p becomes norm(max(0, p - q_s))
    and the next child is tried. When every child is rejected, the next token is drawn from what is left
    of p. Each child must have been sampled from the distribution stored for it in `tree.draft_probs`.
    """
    if tree.draft_probs is None and len(tree) > 1:
        raise ValueError("tree sampling verification needs the distribution each node was sampled from")
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = 0
    while True:
        p = target_probs[node]
        children = tree.children(node)
        order = torch.randperm(len(children), generator=generator).tolist()
        accepted = None
        for child in (children[i] for i in order):
            assert tree.draft_probs is not None
            q = tree.draft_probs[child]
            token = tokens[child]
            if float(torch.rand((), generator=generator, dtype=p.dtype)) * q[token] < p[token]:
                accepted = child
                break
            p = residual_after_rejection(p, q)
        if accepted is None:
            return Verdict(path, int(sample(p, generator)))
        path.append(accepted)
        node = accepted


# The decode loop takes any function of this shape, chosen once per request (tests inject broken ones).
# target_logits is [n, V]: row i scores the token after node i of the tree.
Verifier = Callable[[TokenTree, torch.Tensor, torch.Generator | None], Verdict]


def make_verifier(sampling: SamplingConfig) -> Verifier:
    """Greedy matching or (multi-step) speculative sampling, chosen once; chains take the vectorized
    chain rules, trees the tree walks."""
    if sampling.greedy:
        return verify_greedy_any
    return functools.partial(verify_sampling_any, sampling=sampling)


def verify_greedy_any(
    tree: TokenTree, target_logits: torch.Tensor, generator: torch.Generator | None
) -> Verdict:
    if tree.is_chain:
        return verify_greedy(tree.tokens[1:], target_logits)
    return verify_tree_greedy(tree, target_logits)


def verify_sampling_any(
    tree: TokenTree, target_logits: torch.Tensor, generator: torch.Generator | None, sampling: SamplingConfig
) -> Verdict:
    if len(tree) > 1 and tree.draft_probs is None:
        raise ValueError("speculative sampling needs the distribution each draft token was sampled from")
    target_probs = logits_to_probs(target_logits, sampling)  # [n, V]
    if tree.is_chain:
        draft_probs = target_probs.new_zeros(0, target_probs.shape[-1])  # [k, V]
        if tree.draft_probs is not None:
            draft_probs = tree.draft_probs[1:]
        return verify_speculative_sampling(tree.tokens[1:], draft_probs, target_probs, generator)
    return verify_tree_sampling(tree, target_probs, generator)
