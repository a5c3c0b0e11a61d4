"""A draft model proposing a chain of tokens (one forward each), or running a tree's levels for
`speculate.grow_tree` (one forward per level)."""

from __future__ import annotations

import torch

from swarmspec.drafters.base import Draft, Drafter, draft_chain
from swarmspec.runners.base import ModelRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.tree import TokenTree


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
        self._tree_slots: dict[int, int] = {}  # the tree being grown: node -> cache slot

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        return draft_chain(self._catch_up(context), self._feed, max_tokens, sampling, generator)

    # A tree is grown by `speculate.grow_tree`, level by level, through these three calls: the logits
    # after the root, then one forward per level of new nodes, then `keep_tree` records where the nodes
    # sit in the cache so that `observe` can keep the accepted path.

    def tree_root_logits(self, context: list[int]) -> torch.Tensor:  # [V] after context[-1], the root
        logits = self._catch_up(context)
        self._tree_slots = {0: self.runner.cached_len - 1}  # node -> cache slot, for the nodes run
        return logits

    def tree_level_logits(self, tree: TokenTree, level: list[int]) -> torch.Tensor:  # [len(level), V]
        """Run the nodes `level` of `tree` (their ancestors are run already); the logits after each."""
        mask = tree.ancestor_mask()[level]  # [k, nodes so far]: the cached ones are a prefix
        self._tree_slots.update((node, self.runner.cached_len + i) for i, node in enumerate(level))
        return self.runner.forward(tree.tokens[level], num_logits=len(level), tree_mask=mask)

    def keep_tree(self, tree: TokenTree) -> None:
        """The grown tree is final: its run nodes stay cached until `observe` says which were accepted."""
        self.cached_tree = {}
        canonical = {0: self._tree_slots[0]}
        tokens = tree.tokens.tolist()
        for node in sorted(self._tree_slots)[1:]:
            # Repeated samples under one parent hold equal entries: the first copy stands for all.
            key = (canonical[tree.parents[node]], tokens[node])
            canonical[node] = self.cached_tree.setdefault(key, self._tree_slots[node])

    def observe(self, committed: list[int]) -> None:
        if self.cached_tree is not None:
            self._keep_accepted_path(committed)

    def end(self) -> None:
        self._drop_tree()

    def _catch_up(self, context: list[int]) -> torch.Tensor:  # [V] logits after the last context token
        self._drop_tree()  # a tree nobody reported on
        shared = reusable_prefix(self.cached_ids, context)
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

    def _feed(self, token: int) -> torch.Tensor:  # [V] after `token`
        return self._run(torch.tensor([token], dtype=torch.int64))

    def _run(self, input_ids: torch.Tensor) -> torch.Tensor:  # [V] logits after the last input token
        logits = self.runner.forward(input_ids, num_logits=1)[0]
        self.cached_ids.extend(input_ids.tolist())
        return logits


def reusable_prefix(cached_ids: list[int], context: list[int]) -> int:
    """How many cached tokens a drafter keeps for `context`: the shared prefix, but never all of the
    context, since the last token must run again to give the logits after it."""
    shared = 0
    limit = min(len(cached_ids), len(context) - 1)
    while shared < limit and cached_ids[shared] == context[shared]:
        shared += 1
    return shared
