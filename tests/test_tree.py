"""Token trees: ancestor mask and depths on a hand-drawn tree, one-forward tree verification on a real
(tiny) transformers model with KV compaction, and greedy and multi-step sampling tree verification."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import swarmspec.verify
from swarmspec.runners.hf import HFRunner
from swarmspec.tree import TokenTree, position_ids
from swarmspec.verify import verify_greedy, verify_tree_greedy, verify_tree_sampling

from tiny_models import TrigramLM, tiny_qwen2

#        r(0)
#       /    \
#     a(1)   b(2)
#     /  \
#   c(3) d(4)
#    |
#   e(5)
PARENTS = (-1, 0, 0, 1, 1, 3)
TOKENS = torch.tensor([10, 11, 12, 13, 14, 15])


def path_to(tree: TokenTree, node: int) -> list[int]:
    """Node indices from the root's child down to `node` (empty for the root)."""
    path = []
    while node > 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def hand_tree() -> TokenTree:
    return TokenTree(TOKENS, PARENTS)


def test_ancestor_mask_and_depths_by_hand() -> None:
    tree = hand_tree()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # r
            [1, 1, 0, 0, 0, 0],  # a: r
            [1, 0, 1, 0, 0, 0],  # b: r
            [1, 1, 0, 1, 0, 0],  # c: r a
            [1, 1, 0, 0, 1, 0],  # d: r a
            [1, 1, 0, 1, 0, 1],  # e: r a c
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask(), expected)
    assert position_ids(tree.ancestor_mask(), root_position=10).tolist() == [10, 11, 11, 12, 12, 13]
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4] and tree.children(5) == []
    assert path_to(tree, 5) == [1, 3, 5] and path_to(tree, 0) == []


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [
        ([1, 2], (0, 0), "node 0 must be the root"),
        ([1, 2, 3], (-1, 0), "3 tokens but 2 parents"),
        ([1, 2, 3], (-1, 2, 0), "every parent must precede its child"),
    ],
)
def test_malformed_trees_are_rejected(tokens: list[int], parents: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTree(torch.tensor(tokens), parents)


def test_chain_is_a_tree() -> None:
    chain = TokenTree.chain(7, torch.tensor([1, 2, 3]), torch.full((3, 4), 0.25))
    assert chain.parents == (-1, 0, 1, 2) and chain.tokens.tolist() == [7, 1, 2, 3]
    assert chain.draft_probs is not None and chain.draft_probs.shape == (4, 4)
    assert torch.equal(chain.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("seed", range(4))
def test_tree_forward_equals_each_branch_run_alone(seed: int) -> None:
    """One forward over the tree gives every node the logits of its own root-to-node sequence."""
    model = tiny_qwen2(seed)
    prompt = torch.randint(96, (9,), generator=torch.Generator().manual_seed(seed))
    tree = TokenTree(torch.randint(96, (6,), generator=torch.Generator().manual_seed(seed + 1)), PARENTS)
    runner = HFRunner(model)
    runner.forward(prompt[:-1], num_logits=1)
    tree_tokens = torch.cat([prompt[-1:], tree.tokens[1:]])  # the root is the newest committed token
    tree_logits = runner.forward(tree_tokens, num_logits=len(tree), tree_mask=tree.ancestor_mask())
    for node in range(len(tree)):
        branch = torch.cat([prompt, tree_tokens[path_to(tree, node)]])
        alone = HFRunner(model).forward(branch, num_logits=1)[0]
        torch.testing.assert_close(tree_logits[node], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kept_path", [[1, 3, 5], [2], [1, 4], []])
def test_compaction_keeps_the_accepted_path(kept_path: list[int]) -> None:
    """After compaction to a path, the cache is the one a fresh forward over that sequence builds."""
    model = tiny_qwen2(3)
    prompt = torch.randint(96, (7,), generator=torch.Generator().manual_seed(3))
    tree = TokenTree(torch.randint(96, (6,), generator=torch.Generator().manual_seed(4)), PARENTS)
    runner = HFRunner(model)
    runner.forward(prompt[:-1], num_logits=1)
    tree_tokens = torch.cat([prompt[-1:], tree.tokens[1:]])
    runner.forward(tree_tokens, num_logits=1, tree_mask=tree.ancestor_mask())
    cached = len(prompt) - 1
    runner.compact(cached + 1, [cached + node for node in kept_path])  # the root always stays
    accepted = torch.cat([prompt, tree_tokens[kept_path]])
    assert runner.cached_len == len(accepted)
    probe = torch.tensor([5, 17, 42])
    fresh = HFRunner(model)
    fresh.forward(accepted, num_logits=1)
    torch.testing.assert_close(
        runner.forward(probe, num_logits=3), fresh.forward(probe, num_logits=3), rtol=1e-4, atol=1e-4
    )


def test_trigram_runner_reads_trees_the_same_way() -> None:
    """The test-only TrigramLM implements the same tree interface as HFRunner."""
    lm = TrigramLM(seed=0, vocab_size=4)
    lm.forward(torch.tensor([0, 1]), num_logits=1)
    tree = TokenTree(torch.tensor([2, 3, 0, 1, 2, 3]), PARENTS)
    logits = lm.forward(tree.tokens, num_logits=6, tree_mask=tree.ancestor_mask())
    assert torch.equal(logits[5], lm.table[1, 3])  # e reads r a c e = 2 3 1 3
    assert torch.equal(logits[2], lm.table[2, 0])  # b reads r b = 2 0
    lm.compact(3, [3, 5, 7])  # keep the root (position 2), then a, c, e
    assert lm.tokens == [0, 1, 2, 3, 1, 3]


def one_hot_logits(argmaxes: list[int], vocab: int = 20) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(argmaxes), vocab).float()


def test_greedy_tree_walk_by_hand() -> None:
    tree = hand_tree()  # tokens r10 a11 b12 c13 d14 e15
    # Target: after r -> 11 (a), after a -> 14 (d), after d -> 3 (no child): path a, d; next 3.
    verdict = verify_tree_greedy(tree, one_hot_logits([11, 14, 0, 0, 3, 0]))
    assert (verdict.path, verdict.next_token) == ([1, 4], 3)
    verdict = verify_tree_greedy(tree, one_hot_logits([12, 0, 7, 0, 0, 0]))  # b accepted, then 7
    assert (verdict.path, verdict.next_token) == ([2], 7)
    verdict = verify_tree_greedy(tree, one_hot_logits([9, 0, 0, 0, 0, 0]))  # nothing matches
    assert (verdict.path, verdict.next_token) == ([], 9)
    verdict = verify_tree_greedy(tree, one_hot_logits([11, 13, 0, 15, 0, 8]))  # whole a-c-e branch
    assert (verdict.path, verdict.next_token) == ([1, 3, 5], 8)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_tree_on_a_chain_equals_chain_verification(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    draft = torch.randint(4, (5,), generator=generator)
    logits = torch.randn(6, 4, generator=generator)
    chain = verify_greedy(draft, logits)
    tree = verify_tree_greedy(TokenTree.chain(0, draft), logits)
    assert (len(tree.path), tree.next_token) == (chain.accepted_len, chain.next_token)
    assert tree.path == list(range(1, chain.accepted_len + 1))


VOCAB = 5
SAMPLES = 12_000


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True)


def sampled_tree_outcomes(seed: int) -> tuple[torch.Tensor, ...]:
    """Two drafters with different distributions each propose a 2-token branch, sampled from their own
    distribution; returns the target's tables and the counts of (first token) and (first, second)."""
    generator = torch.Generator().manual_seed(seed)
    target_1 = normalized(torch.rand(VOCAB, generator=generator) ** 2)  # p(x1)
    target_2 = normalized(torch.rand(VOCAB, VOCAB, generator=generator) ** 2)  # p(x2 | x1)
    drafters_1 = normalized(torch.rand(2, VOCAB, generator=generator) ** 3)  # q_d(x1)
    drafters_2 = normalized(torch.rand(2, VOCAB, VOCAB, generator=generator) ** 3)  # q_d(x2 | x1)
    first = torch.zeros(VOCAB)
    pairs = torch.zeros(VOCAB, VOCAB)
    for _ in range(SAMPLES):
        x1 = [int(torch.multinomial(drafters_1[d], 1, generator=generator)) for d in range(2)]
        x2 = [int(torch.multinomial(drafters_2[d, x1[d]], 1, generator=generator)) for d in range(2)]
        tree = TokenTree(
            torch.tensor([0, x1[0], x1[1], x2[0], x2[1]]),
            (-1, 0, 0, 1, 2),
            torch.stack(
                [drafters_1[0], drafters_1[0], drafters_1[1], drafters_2[0, x1[0]], drafters_2[1, x1[1]]]
            ),
        )
        target_probs = torch.stack(
            [
                target_1,
                target_2[x1[0]],
                target_2[x1[1]],
                torch.full((VOCAB,), 1 / VOCAB),
                torch.full((VOCAB,), 1 / VOCAB),
            ]
        )
        verdict = verify_tree_sampling(tree, target_probs, generator)
        out = [int(tree.tokens[n]) for n in verdict.path] + [verdict.next_token]
        first[out[0]] += 1
        if len(out) >= 2:
            pairs[out[0], out[1]] += 1
    return target_1, target_2, first, pairs


def tree_sampling_p_values(seed: int) -> tuple[float, float]:
    target_1, target_2, first, pairs = sampled_tree_outcomes(seed)
    p_first = chisquare(first.numpy(), (target_1 * SAMPLES).numpy()).pvalue
    # Given the first token, the second follows p(x2 | x1) (pooled over x1 with enough samples).
    observed, expected = [], []
    for x1 in range(VOCAB):
        total = pairs[x1].sum()
        if total >= 200:
            observed.append(pairs[x1])
            expected.append(target_2[x1] * total)
    p_second = chisquare(torch.cat(observed).numpy(), torch.cat(expected).numpy()).pvalue
    return float(p_first), float(p_second)


@pytest.mark.slow
def test_multi_step_speculative_sampling_is_exact() -> None:
    p_first, p_second = tree_sampling_p_values(seed=0)
    assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)


@pytest.mark.slow
def test_broken_residual_update_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarmspec.verify, "residual_after_rejection", lambda p, q: p)
    p_first, p_second = tree_sampling_p_values(seed=0)
    assert min(p_first, p_second) < 1e-6, (p_first, p_second)
