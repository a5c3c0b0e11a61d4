"""Model-free drafters: continuations copied from text already seen, at almost no cost.

Both propose deterministically. In sampling mode a deterministic proposal is a draw from a point mass,
so each draft row is one-hot: speculative sampling then accepts token x with probability p(x) and,
on rejection, samples from p with x removed, which keeps the output distribution exactly p.
"""

from __future__ import annotations

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.sampling import SamplingConfig


class NgramDrafter(Drafter):
    """Shared by the model-free drafters: n-gram lengths to try, longest first, and the vocabulary size
    their one-hot sampling rows need."""

    def __init__(self, vocab_size: int, max_ngram: int, min_ngram: int) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram


class PromptLookupDrafter(NgramDrafter):
    """Prompt lookup decoding: find the latest earlier occurrence of the context's last n tokens
    (n from `max_ngram` down to `min_ngram`) in the prompt and output so far, and propose what followed.

    Shines where the answer copies its input: summarization, RAG, code edits.
    """

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        super().__init__(vocab_size, max_ngram, min_ngram)

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            start = find_latest(context, context[-n:], end=len(context) - 1)
            if start >= 0:
                follow = context[start + n : start + n + max_tokens]
                return point_mass_draft(follow, self.vocab_size, sampling)
        return Draft.empty()


def find_latest(sequence: list[int], pattern: list[int], end: int) -> int:
    """Start of the latest occurrence of `pattern` that ends before index `end`, or -1."""
    n = len(pattern)
    for start in range(end - n, -1, -1):
        if sequence[start : start + n] == pattern:
            return start
    return -1


def point_mass_draft(tokens: list[int], vocab_size: int, sampling: SamplingConfig) -> Draft:
    """A deterministic draft; in sampling mode each row's distribution is the one-hot of its token."""
    draft = Draft.of(tokens)
    if sampling.greedy or not tokens:
        return draft
    return Draft(draft.tokens, torch.nn.functional.one_hot(draft.tokens, vocab_size).float())


class SuffixDrafter(NgramDrafter):
    """Suffix matching over earlier sequences of this process (SuffixDecoding-like).

    Every finished sequence (prompt and output) is indexed by its n-grams; a draft is what followed the
    latest earlier occurrence of the context's last n tokens, longest n first. A sequence counts as
    finished when a context arrives that does not extend it. Repetitive workloads (agents, the same
    template over many inputs, code edits) draft long runs from earlier answers.
    """

    def __init__(self, vocab_size: int, max_ngram: int = 4, min_ngram: int = 2) -> None:
        super().__init__(vocab_size, max_ngram, min_ngram)
        self.sequences: list[list[int]] = []
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (sequence, end position)
        self.current: list[int] = []

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if self.current and context[: len(self.current)] != self.current:
            self._archive(self.current)
        self.current = list(context)
        if max_tokens <= 0:
            return Draft.empty()
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            hit = self.index.get(tuple(context[-n:]))
            if hit is not None:
                sequence, end = hit
                follow = self.sequences[sequence][end : end + max_tokens]
                return point_mass_draft(follow, self.vocab_size, sampling)
        return Draft.empty()

    def _archive(self, sequence: list[int]) -> None:
        number = len(self.sequences)
        self.sequences.append(sequence)
        for n in range(self.min_ngram, self.max_ngram + 1):
            for end in range(n, len(sequence)):  # an n-gram with at least one token after it
                self.index[tuple(sequence[end - n : end])] = (number, end)
