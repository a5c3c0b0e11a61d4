"""Model-free drafters: continuations copied from text already seen, at almost no cost.

Both propose deterministically. In sampling mode a deterministic proposal is a draw from a point mass,
so each draft row is one-hot: speculative sampling then accepts token x with probability p(x) and,
on rejection, samples from p with x removed, which keeps the output distribution exactly p.
"""

from __future__ import annotations

from typing import Literal

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.sampling import SamplingConfig

Occurrence = Literal["latest", "earliest"]


class PromptLookupDrafter(Drafter):
    """Prompt lookup decoding: find an earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to `min_ngram`) in the prompt and output so far, and propose what followed.

    `occurrence` says which: the latest (what the output has just been repeating: code, lists) or the
    earliest (usually in the prompt, as transformers' prompt lookup does: a summary copying its source
    document sentence by sentence). A tree or vote with both drafters follows whichever the target takes.

    Shines where the answer copies its input: summarization, RAG, code edits. The n-grams of the
    context are indexed as it grows (each token once): a proposal looks its n-grams up instead of
    scanning the context.
    """

    def __init__(
        self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, occurrence: Occurrence = "latest"
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if occurrence not in ("latest", "earliest"):
            raise ValueError(f"occurrence must be 'latest' or 'earliest', got {occurrence!r}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.occurrence = occurrence
        self.indexed: list[int] = []  # the context whose n-grams are in `match_end`
        # n-gram -> index of its last token in the chosen occurrence among those ending before the
        # context's last token (the context's own final n-gram is not a match for itself).
        self.match_end: dict[tuple[int, ...], int] = {}

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        self._index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            end = self.match_end.get(tuple(context[-n:]))
            if end is not None:
                return point_mass_draft(context[end + 1 : end + 1 + max_tokens], self.vocab_size, sampling)
        return Draft.empty()

    def _index(self, context: list[int]) -> None:
        """Index the n-grams ending at positions up to len(context) - 2, reusing what is indexed when
        `context` extends it (a new sequence starts over)."""
        known = len(self.indexed)
        if context[:known] != self.indexed:
            self.indexed, self.match_end, known = [], {}, 0
        keep_first = self.occurrence == "earliest"
        for end in range(max(known - 1, 0), len(context) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                gram = tuple(context[end - n + 1 : end + 1])
                if not (keep_first and gram in self.match_end):
                    self.match_end[gram] = end
        self.indexed = list(context)


def point_mass_draft(tokens: list[int], vocab_size: int, sampling: SamplingConfig) -> Draft:
    """A deterministic draft; in sampling mode each row's distribution is the one-hot of its token."""
    draft = Draft.of(tokens)
    if sampling.greedy or not tokens:
        return draft
    return Draft(draft.tokens, torch.nn.functional.one_hot(draft.tokens, vocab_size).float())


class SuffixIndex:
    """The n-grams of finished sequences, shared by every suffix drafter of an engine, bounded in memory:
    past `max_tokens` indexed tokens the oldest sequences are forgotten."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, max_tokens: int = 1_000_000) -> None:
        self.max_ngram, self.min_ngram, self.max_tokens = max_ngram, min_ngram, max_tokens
        self.sequences: dict[int, list[int]] = {}  # number -> tokens, oldest first
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (sequence number, end position)
        self.tokens = 0
        self._next = 0

    def add(self, sequence: list[int]) -> None:
        number, self._next = self._next, self._next + 1
        self.sequences[number] = list(sequence)
        self.tokens += len(sequence)
        for n in range(self.min_ngram, self.max_ngram + 1):
            for end in range(n, len(sequence)):  # an n-gram with at least one token after it
                self.index[tuple(sequence[end - n : end])] = (number, end)
        while self.tokens > self.max_tokens and len(self.sequences) > 1:
            oldest = next(iter(self.sequences))
            self.tokens -= len(self.sequences.pop(oldest))
            self.index = {gram: hit for gram, hit in self.index.items() if hit[0] != oldest}

    def follow(self, context: list[int], max_tokens: int) -> list[int]:
        """What followed the latest indexed occurrence of the context's last n tokens, longest n first."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            hit = self.index.get(tuple(context[-n:]))
            if hit is not None:
                sequence, end = hit
                return self.sequences[sequence][end : end + max_tokens]
        return []


class SuffixDrafter(Drafter):
    """Suffix matching over earlier sequences (SuffixDecoding-like): a draft is what followed the latest
    earlier occurrence of the context's last n tokens in a finished sequence (prompt and output). The
    index is shared: pass one `SuffixIndex` to every suffix drafter of an engine. Repetitive workloads
    (agents, the same template over many inputs, code edits) draft long runs from earlier answers.
    """

    def __init__(self, vocab_size: int, index: SuffixIndex | None = None) -> None:
        self.vocab_size = vocab_size
        self.index = index or SuffixIndex()
        self.sequence: list[int] = []

    def begin(self, prompt_ids: list[int]) -> None:
        self.sequence = list(prompt_ids)

    def observe(self, committed: list[int]) -> None:
        self.sequence.extend(committed)

    def end(self) -> None:
        if self.sequence:
            self.index.add(self.sequence)
        self.sequence = []

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        return point_mass_draft(self.index.follow(context, max_tokens), self.vocab_size, sampling)
