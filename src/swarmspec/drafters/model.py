"""A draft model proposing a chain of tokens (one forward each) or a tree (one forward per level)."""

from __future__ import annotations

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.runners.base import ModelRunner
from swarmspec.sampling import SamplingConfig, choose_tokens, logits_to_probs
from swarmspec.tree import TokenTree, TreeShape


class ModelDrafter(Drafter):
    """Runs a small LM autoregressively on its own KV cache.

    The drafter keeps the ids its cache holds and, on each call, rolls back to the longest prefix the
    cache shares with the new context, so rejected drafts are discarded and whatever the target
    committed since the last call is caught up in one forward (a new sequence reuses a shared prompt
    prefix). A tree's nodes stay cached until `observe` says what the target committed: the entries
    of the accepted path are kept (compaction), the rest dropped.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cached_ids: list[int] = []
        # The last tree's nodes that sit in the cache after `cached_ids`: (parent, token) -> cache slot.
        self.cached_tree: dict[tuple[int, int], int] | None = None

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        logits = self._catch_up(context)  # [V]
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for i in range(max_tokens):
            token, token_probs = choose_tokens(logits, sampling, generator)
            tokens.append(token)
            if token_probs is not None:
                probs.append(token_probs)
            # The last drafted token is not run: its logits would only serve a longer draft.
            if i + 1 < max_tokens:
                logits = self._run(token.view(1))
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)

    def propose_tree(
        self,
        context: list[int],
        shape: TreeShape,
        max_depth: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        """A token tree grown level by level, `shape` saying how many children each node gets.

        Greedy: a node's n children are the n most probable tokens of its distribution. Sampling: n
        independent draws from it (repeats stay separate children), each child keeping that distribution,
        as multi-step speculative sampling requires. One drafter forward per level reads all its nodes.
        """
        levels = shape.levels(max_depth)
        if levels == 0:  # nothing to draft (the generation's last token): skip the catch-up forward
            return TokenTree.chain(context[-1], torch.empty(0, dtype=torch.int64))
        logits = self._catch_up(context)[None]  # [1, V]: after the root
        base = self.runner.cached_len  # the root, context[-1], is the last cached token
        tokens, parents = [context[-1]], [-1]
        probs: list[torch.Tensor] = [torch.zeros_like(logits[0])]
        path_confidences = [1.0]
        frontier = [0]
        slots = {0: base - 1}  # node -> cache position, for the nodes the drafter has run
        for depth in range(levels):
            # Greedy drafting has no distribution; its confidence is the drafter's plain softmax.
            dists = logits.softmax(dim=-1) if sampling.greedy else logits_to_probs(logits, sampling)
            counts = shape.child_counts(
                depth, levels, len(tokens) - 1, [path_confidences[n] for n in frontier], dists
            )
            children = []
            for node, dist, count in zip(frontier, dists, counts, strict=True):
                if count == 0:
                    continue
                if sampling.greedy:
                    chosen = dist.topk(count).indices
                else:
                    chosen = torch.multinomial(dist, count, replacement=True, generator=generator)
                for token in chosen.tolist():
                    tokens.append(token)
                    parents.append(node)
                    if not sampling.greedy:
                        probs.append(dist)
                    path_confidences.append(path_confidences[node] * dist[token].item())
                    children.append(len(tokens) - 1)
            frontier = children
            if not frontier or depth + 1 == levels:  # leaves need no logits
                break
            tree = TokenTree(torch.tensor(tokens), tuple(parents))
            mask = tree.ancestor_mask()[frontier]  # [k, nodes so far]: cached ones are a prefix
            slots.update((node, self.runner.cached_len + i) for i, node in enumerate(frontier))
            logits = self.runner.forward(tree.tokens[frontier], num_logits=len(frontier), tree_mask=mask)
        self.cached_tree = {}
        canonical = {0: base - 1}
        for node in sorted(slots)[1:]:
            # Repeated samples under one parent hold equal entries: the first copy stands for all.
            key = (canonical[parents[node]], tokens[node])
            canonical[node] = self.cached_tree.setdefault(key, slots[node])
        draft_probs = None if sampling.greedy else torch.stack(probs)
        return TokenTree(torch.tensor(tokens, dtype=torch.int64), tuple(parents), draft_probs)

    def observe(self, committed: list[int]) -> None:
        if self.cached_tree is not None:
            self._keep_accepted_path(committed)

    def end(self) -> None:
        self._drop_tree()

    def _catch_up(self, context: list[int]) -> torch.Tensor:  # [V] logits after the last context token
        self._drop_tree()  # a tree nobody reported on
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # always rerun >= 1 token to get logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        self.runner.rollback(shared)
        del self.cached_ids[shared:]
        return self._run(torch.tensor(context[shared:], dtype=torch.int64))

    def _keep_accepted_path(self, committed: list[int]) -> None:
        """Compact the last tree's cached nodes to those the target accepted (`committed` starts with
        the accepted tokens below the root)."""
        tree, self.cached_tree = self.cached_tree, None
        assert tree is not None
        base = len(self.cached_ids)
        path: list[int] = []
        slot = base - 1  # the root
        for token in committed:
            slot = tree.get((slot, token), -1)
            if slot < 0:
                break
            path.append(slot)
        self.runner.compact(base, path)
        self.cached_ids.extend(committed[: len(path)])

    def _drop_tree(self) -> None:
        if self.cached_tree is not None:
            self.cached_tree = None
            self.runner.compact(len(self.cached_ids), [])

    def _run(self, input_ids: torch.Tensor) -> torch.Tensor:  # [V] logits after the last input token
        logits = self.runner.forward(input_ids, num_logits=1)[0]
        self.cached_ids.extend(input_ids.tolist())
        return logits
