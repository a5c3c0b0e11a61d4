"""The llama.cpp runner on the real packaged GGUFs: exact logits for chains, trees and kept paths,
greedy equality of every method with plain decoding on llama.cpp, and speculative sampling through it
drawing the target's exact distribution.

Slow: assembles the packaged GGUFs (seconds) and runs them on llama.cpp. Equality is bit-exact:
verification must reproduce llama.cpp's own one-token-at-a-time logits (see runners/llama_cpp.py).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch

from swarmspec.config import AUTO, LLAMA_CPP_PREFIX, EngineConfig, GenerationRequest
from swarmspec.decode import decode
from swarmspec.drafters.model import ModelDrafter
from swarmspec.engine import Engine
from swarmspec.errors import InvalidRequestError, ModelIntegrityError, ModelNotFoundError
from swarmspec.metrics import DecodeStats
from swarmspec.models.gguf_exit import write_exit_gguf
from swarmspec.models.loading import LoadedModel, load_model
from swarmspec.models.registry import DEFAULT_DRAFTER, DEFAULT_TARGET
from swarmspec.policy import FixedDepth
from swarmspec.runners.batch import Forward
from swarmspec.runners.llama_cpp import EXACT_ROWS, LlamaCppModel, LlamaCppRunner
from swarmspec.sampling import SamplingConfig, logits_to_probs
from swarmspec.speculate import ChainSpeculation
from swarmspec.tree import TokenTree
from swarmspec.verify import Verifier, make_verifier

from test_sampling_exact import broken, p_value

pytestmark = pytest.mark.slow

TARGET = LLAMA_CPP_PREFIX + DEFAULT_TARGET
DRAFTER = LLAMA_CPP_PREFIX + DEFAULT_DRAFTER


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return load_model(TARGET)


@pytest.fixture(scope="module")
def drafter() -> LoadedModel:
    return load_model(DRAFTER)


def context_ids(seed: int, n: int = 60) -> torch.Tensor:
    return torch.randint(1000, 30000, (n,), generator=torch.Generator().manual_seed(seed))


def fresh_logits(model: LoadedModel, context: torch.Tensor, tokens: list[int]) -> torch.Tensor:  # [k, V]
    runner = model.new_runner()
    runner.forward(context, num_logits=1)
    return runner.forward(torch.tensor(tokens), num_logits=len(tokens))


@pytest.mark.parametrize("context_len", [60, 600], ids=["short", "over-512-cells"])
@pytest.mark.parametrize("spec", [TARGET, DRAFTER])
def test_chain_forward_equals_one_token_at_a_time(
    spec: str, context_len: int, target: LoadedModel, drafter: LoadedModel
) -> None:
    """Beyond 512 cache cells llama.cpp's kernels change again (flash attention's split keys): checked."""
    model = target if spec == TARGET else drafter
    context = context_ids(1, context_len)
    runner = model.new_runner()
    logits = runner.forward(context, num_logits=1)
    tokens, one_by_one = [], []
    for _ in range(2 * EXACT_ROWS + 2):  # several verification chunks
        tokens.append(int(logits[-1].argmax()))
        logits = runner.forward(torch.tensor(tokens[-1:]), num_logits=1)
        one_by_one.append(logits[0])
    runner.rollback(len(context))
    batched = runner.forward(torch.tensor(tokens), num_logits=len(tokens))
    assert torch.equal(batched, torch.stack(one_by_one))


def test_tree_forward_gives_each_node_its_branch_logits(target: LoadedModel) -> None:
    context = context_ids(2)
    # Two branches of the root, the first with two children, one leaf three deep: 9 nodes, 3 chunks.
    parents = (-1, 0, 0, 1, 1, 2, 3, 6, 4)
    tree = TokenTree(
        torch.randint(1000, 30000, (len(parents),), generator=torch.Generator().manual_seed(3)), parents
    )
    runner = target.new_runner()
    runner.forward(context, num_logits=1)
    logits = runner.forward(tree.tokens, num_logits=len(tree), tree_mask=tree.ancestor_mask())
    for node in range(len(tree)):
        path = [node]
        while tree.parents[path[-1]] >= 0:
            path.append(tree.parents[path[-1]])
        branch = [int(tree.tokens[i]) for i in reversed(path)]
        assert torch.equal(logits[node], fresh_logits(target, context, branch)[-1]), f"node {node}"


@pytest.mark.parametrize("kept", [[1, 3], [2, 5], []])
def test_kept_tree_path_equals_a_fresh_forward(kept: list[int], target: LoadedModel) -> None:
    """Keeping a path (contiguous in the cache or not) and decoding on equals a fresh forward of it."""
    context = context_ids(4)
    parents = (-1, 0, 0, 1, 2, 2)
    tokens = torch.tensor([500, 600, 700, 800, 900, 1000])
    runner = target.new_runner()
    runner.forward(context, num_logits=1)
    runner.forward(tokens, num_logits=len(parents), tree_mask=TokenTree(tokens, parents).ancestor_mask())
    root = len(context)
    runner.compact(root + 1, [root + node for node in kept])
    assert runner.cached_len == root + 1 + len(kept)
    after = runner.forward(torch.tensor([1234, 4321]), num_logits=2)
    path = [500, *[int(tokens[n]) for n in kept], 1234, 4321]
    assert torch.equal(after, fresh_logits(target, context, path)[-2:])


def test_drafter_tree_over_cached_levels_equals_branches(drafter: LoadedModel) -> None:
    """A tree fed level by level on top of cached nodes (how draft models grow trees) sees its branch.
    Bit-exact here, although siblings sit in cells away from their positions (which the runner does
    not promise to be exact for drafters)."""
    context = context_ids(5)
    runner = drafter.new_runner()
    runner.forward(context, num_logits=1)
    tree = TokenTree(torch.tensor([int(context[-1]), 11, 12, 13, 14, 15]), (-1, 0, 0, 1, 1, 2))
    mask = tree.ancestor_mask()
    runner.forward(tree.tokens[1:3], num_logits=2, tree_mask=mask[1:3, :3])  # level 1; the root is cached
    level2 = runner.forward(tree.tokens[3:], num_logits=3, tree_mask=mask[3:])
    for row, branch in zip(level2, ([11, 13], [11, 14], [12, 15]), strict=True):
        assert torch.equal(row, fresh_logits(drafter, context, branch)[-1])


PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps. The fox runs away quickly.",
    "Translate to French: I would like a cup of coffee, please.",
    "What is 17 times 23? Explain step by step.",
]
CONFIGS = [
    EngineConfig(target=TARGET, method="chain", gamma=4),
    EngineConfig(target=TARGET, method="chain", drafters=("prompt-lookup",), gamma=6),
    EngineConfig(target=TARGET, method="tree", gamma=4),
    EngineConfig(target=TARGET, method="tree", tree_budget=8, gamma=5),
    EngineConfig(target=TARGET, method="tree", tree_widths=(2, 2, 1), gamma=3),
    EngineConfig(target=TARGET, method="vote", gamma=3),
    EngineConfig(target=TARGET, method="vote"),  # self-tuning, from this machine's measured costs
    # DSI: target instances are contexts over the one loaded model, each catching up on its own.
    EngineConfig(target=TARGET, method="dsi", targets=2, lookahead=3),
    EngineConfig(target=TARGET, method="dsi", drafters=("prompt-lookup",), targets=3, lookahead=2),
    # The pipeline: the 0.5B drafts on a thread of its own while the target verifies (gamma 4 a job, or
    # self-tuning from the target's costs on its own core).
    EngineConfig(target=TARGET, method="pipeline", gamma=4),
    EngineConfig(target=TARGET, method="pipeline"),
]


def test_every_method_greedy_equals_plain_decoding(target: LoadedModel, drafter: LoadedModel) -> None:
    draft_models = {DRAFTER: drafter}
    plain = Engine.from_models(EngineConfig(target=TARGET, method="ar"), target, {})
    engines = [Engine.from_models(config, target, draft_models) for config in CONFIGS]
    for prompt in PROMPTS:
        request = GenerationRequest(prompt, max_new_tokens=40)
        expected = plain.generate(request).token_ids
        for config, engine in zip(CONFIGS, engines, strict=True):
            result = engine.generate(request)
            assert result.token_ids == expected, (config, prompt)
            if (
                config.gamma != AUTO and config.model_drafters and config.method != "dsi"
            ):  # a fixed gamma drafts
                assert result.stats.drafted_tokens > 0


def test_llama_cpp_runner_is_used(target: LoadedModel) -> None:
    assert isinstance(target.new_runner(), LlamaCppRunner) and target.backend == "llamacpp"


def test_bad_gguf_files_give_clear_errors(tmp_path: Path, drafter: LoadedModel) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model .* for llama.cpp"):
        load_model(f"{LLAMA_CPP_PREFIX}{tmp_path / 'missing.gguf'}")
    text = tmp_path / "notes.gguf"
    text.write_text("not weights")
    with pytest.raises(ModelIntegrityError, match="is not a GGUF file"):
        load_model(f"{LLAMA_CPP_PREFIX}{text}")
    truncated = tmp_path / "truncated.gguf"
    with drafter.gguf_path.open("rb") as source:
        truncated.write_bytes(source.read(5_000_000))  # the header and tensor table, not the data
    with pytest.raises(ModelIntegrityError, match=r"could not load .* \(truncated or corrupt GGUF\?\)"):
        load_model(f"{LLAMA_CPP_PREFIX}{truncated}")


EXIT_DRAFTER = f"{LLAMA_CPP_PREFIX}exit6:{DEFAULT_DRAFTER}"


def test_exit_after_every_layer_is_the_model_itself(tmp_path: Path, drafter: LoadedModel) -> None:
    """An exit GGUF (models.gguf_exit) after all of the model's layers, with its own norm, computes the
    model's logits bit for bit: the copy keeps every tensor and setting."""
    path = tmp_path / "exit24.gguf"
    write_exit_gguf(drafter.gguf_path, 24, path)
    context = context_ids(3, 20)
    exit_runner = LlamaCppModel(path).new_runner()
    assert torch.equal(exit_runner.forward(context, 20), drafter.new_runner().forward(context, 20))


def test_shallow_exit_is_the_truncated_model_with_its_norm(tmp_path: Path, drafter: LoadedModel) -> None:
    """The untrained exit after 6 layers runs the model's first 6 layers, its final norm and its head:
    its logits are PyTorch's for the same truncated model up to llama.cpp's quantized arithmetic
    (nearer than with one layer more or fewer); an exit written with its norm doubled gives exactly
    doubled logits."""
    untrained = tmp_path / "exit6.gguf"  # not `llamacpp:exit6:`, which takes trained norms if stored
    write_exit_gguf(drafter.gguf_path, 6, untrained)
    hf = load_model(DEFAULT_DRAFTER).hf_model
    ids = torch.tensor(drafter.tokenizer(PROMPTS[0]).input_ids)
    logits = LlamaCppModel(untrained).new_runner().forward(ids, len(ids))
    with torch.no_grad():
        hidden = hf(ids[None], output_hidden_states=True).hidden_states
        distances = [float((hf.lm_head(hf.model.norm(hidden[d][0])) - logits).abs().max()) for d in (5, 6, 7)]
    assert distances[1] < 1.0 and distances[1] < min(distances[0], distances[2]) / 4, distances
    doubled = tmp_path / "exit6-doubled.gguf"
    write_exit_gguf(drafter.gguf_path, 6, doubled, norm=2 * hf.model.norm.weight)
    assert torch.equal(LlamaCppModel(doubled).new_runner().forward(ids, len(ids)), 2 * logits)


def test_chain_drafted_by_an_exit_equals_plain_decoding(target: LoadedModel) -> None:
    exit_model = load_model(EXIT_DRAFTER)
    plain = Engine.from_models(EngineConfig(target=TARGET, method="ar"), target, {})
    config = EngineConfig(target=TARGET, method="chain", drafters=(EXIT_DRAFTER,), gamma=3)
    chain = Engine.from_models(config, target, {EXIT_DRAFTER: exit_model})
    for prompt in PROMPTS[:2]:
        request = GenerationRequest(prompt, max_new_tokens=32)
        result = chain.generate(request)
        assert result.token_ids == plain.generate(request).token_ids
        assert result.stats.drafted_tokens > 0


@pytest.mark.parametrize("depth", [0, 25])
def test_exit_beyond_the_model_is_refused(depth: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"has 24 layers: there is no exit after {depth}"):
        load_model(f"{LLAMA_CPP_PREFIX}exit{depth}:{DEFAULT_DRAFTER}")


SAMPLED_TOKENS = 3  # the first from the prefill, then one step that drafts 2 (it drafts <= remaining - 1)
SAMPLES = 500


def sampled_counts(
    target: LoadedModel, drafter: LoadedModel, verifier: Verifier, sampling: SamplingConfig, prompt: list[int]
) -> dict[tuple[int, ...], int]:
    """How often each sequence of the first SAMPLED_TOKENS tokens was generated."""
    target_runner, draft = target.new_runner(), ModelDrafter(drafter.new_runner())
    generator = torch.Generator().manual_seed(99)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(SAMPLES):
        chunks = decode(
            target_runner, ChainSpeculation(draft), verifier, prompt,
            max_new_tokens=SAMPLED_TOKENS + 1, policy=FixedDepth(2, 1), sampling=sampling,
            stop_token_ids=frozenset(), generator=generator, stats=DecodeStats(),
        )  # fmt: skip
        sequence = tuple(t for chunk in chunks for t in chunk)[:SAMPLED_TOKENS]
        counts[sequence] = counts.get(sequence, 0) + 1
    return counts


def exact_probabilities(
    target: LoadedModel, sampling: SamplingConfig, prompt: list[int]
) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under the target alone, over every continuation its top-k allows."""
    runner = target.new_runner()
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(SAMPLED_TOKENS):
        longer = {}
        for sequence, p in probs.items():
            runner.reset()
            logits = runner.forward(torch.tensor([*prompt, *sequence]), num_logits=1)[0]
            dist = logits_to_probs(logits, sampling)
            for token in dist.nonzero().flatten().tolist():
                longer[(*sequence, token)] = p * float(dist[token])
        probs = longer
    return probs


@pytest.fixture(scope="module")
def exit18(tmp_path_factory: pytest.TempPathFactory, drafter: LoadedModel) -> LoadedModel:
    """The 0.5B's untrained exit after 18 of its 24 layers (a drafter that is right about half the time)."""
    path = tmp_path_factory.mktemp("exit") / "exit18.gguf"
    write_exit_gguf(drafter.gguf_path, 18, path)
    return LoadedModel("exit18", LlamaCppModel(path), drafter.tokenizer)


@pytest.mark.parametrize("rule", ["correct", "swapped_roles"])
def test_sampling_through_llama_cpp_is_the_targets_distribution(
    rule: str, drafter: LoadedModel, exit18: LoadedModel
) -> None:
    """Speculative sampling on llama.cpp (the 0.5B as target, drafted by its 18-layer exit: the same
    runner as any target, at a fraction of the 1.5B's cost per sample) draws the target's own
    distribution of three tokens (chi-squared); a verifier with target and draft distributions swapped
    fails."""
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    prompt = drafter.tokenizer("def fibonacci(n):").input_ids
    verifier = make_verifier(sampling) if rule == "correct" else broken(rule, sampling)
    counts = sampled_counts(drafter, exit18, verifier, sampling, prompt)
    exact = exact_probabilities(drafter, sampling, prompt)
    cells = sorted(set(exact) | set(counts))
    p = p_value(
        torch.tensor([float(counts.get(c, 0)) for c in cells], dtype=torch.float64),
        torch.tensor([exact.get(c, 0.0) for c in cells], dtype=torch.float64),
    )
    assert p > 1e-3 if rule == "correct" else p < 1e-6


def test_batched_rows_are_bit_identical_to_each_sequence_alone(target: LoadedModel) -> None:
    """Continuous batching on llama.cpp: three sequences (one past 512 cells), each in its own cache
    stream, their rows sharing `llama_decode` calls (chains of 1-4 tokens, rollbacks in between): every
    row's logits equal the sequence's own one-token-at-a-time decoding, bit for bit."""
    contexts = [context_ids(7, 60), context_ids(8, 600), context_ids(9, 130)]
    alone = []  # each sequence's greedy tokens and their logits, one token at a time
    for context in contexts:
        runner = target.new_runner()
        logits = runner.forward(context, num_logits=1)
        tokens, rows = [], []
        for _ in range(9):
            tokens.append(int(logits[-1].argmax()))
            logits = runner.forward(torch.tensor(tokens[-1:]), num_logits=1)
            rows.append(logits[0])
        alone.append((tokens, torch.stack(rows)))
    batched = target.new_batched_target(max_batch=3)
    slots = [batched.slot() for _ in contexts]
    for slot, context in zip(slots, contexts, strict=True):
        prompt = Forward(context, 1, None)
        while prompt.logits is None:  # the 600-token prompt joins in two steps
            batched.run({slot: prompt})
    done = [0, 0, 0]
    for chunk in [(1, 2, 3), (4, 1, 2), (2, 3, 1), (2, 3, 3)]:
        forwards = {
            slot: Forward(torch.tensor(alone[s][0][done[s] : done[s] + k]), k, None)
            for s, (slot, k) in enumerate(zip(slots, chunk, strict=True))
        }
        batched.run(forwards)
        for s, slot in enumerate(slots):
            k = chunk[s]
            assert torch.equal(forwards[slot].logits, alone[s][1][done[s] : done[s] + k]), (s, chunk)
            slot.rollback(len(contexts[s]) + done[s] + k - 1)  # drop the last row: fed again next
            done[s] += k - 1
    for slot in slots:
        slot.end()
    assert sorted(batched.free_seqs) == [0, 1, 2]


def branch_logits(model: LoadedModel, context: torch.Tensor, tree: TokenTree, node: int) -> torch.Tensor:
    """The logits after `node` when its branch (root first) is decoded after `context` alone."""
    path = [node]
    while tree.parents[path[-1]] >= 0:
        path.append(tree.parents[path[-1]])
    return fresh_logits(model, context, [int(tree.tokens[i]) for i in reversed(path)])[-1]


def test_batched_trees_are_bit_identical_to_each_branch_alone(target: LoadedModel) -> None:
    """Trees verified in a batch (sharing `llama_decode` calls with each other and with a chain): every
    node's logits equal its branch decoded alone; a kept path that is not the last branch decoded is fed
    again in the next step, whose rows equal a fresh forward of the path, bit for bit."""
    contexts = [context_ids(11, 50), context_ids(12, 70), context_ids(13, 90)]
    generator = torch.Generator().manual_seed(5)
    trees = [
        TokenTree(torch.randint(1000, 30000, (9,), generator=generator), (-1, 0, 0, 1, 1, 2, 3, 6, 4)),
        TokenTree(torch.randint(1000, 30000, (6,), generator=generator), (-1, 0, 0, 1, 2, 2)),
        TokenTree(torch.randint(1000, 30000, (4,), generator=generator), (-1, 0, 1, 2)),  # a chain
    ]
    kept = [[1, 3], [2, 5], [1, 2, 3]]  # the first two are not the last branch decoded
    batched = target.new_batched_target(max_batch=3)
    slots = [batched.slot() for _ in contexts]
    for slot, context in zip(slots, contexts, strict=True):
        batched.run({slot: Forward(context, 1, None)})
    forwards = {
        slot: Forward(tree.tokens, len(tree), tree.ancestor_mask())
        for slot, tree in zip(slots, trees, strict=True)
    }
    batched.run(forwards)
    after = torch.tensor([1234, 4321])
    for slot, context, tree, path in zip(slots, contexts, trees, kept, strict=True):
        for node in range(len(tree)):
            expected = branch_logits(target, context, tree, node)
            assert torch.equal(forwards[slot].logits[node], expected), (len(context), node)
        root = len(context)
        slot.compact(root + 1, [root + node for node in path])
        assert slot.cached_len == root + 1 + len(path)
    nexts = {slot: Forward(after, 2, None) for slot in slots}
    batched.run(nexts)
    for slot, context, tree, path in zip(slots, contexts, trees, kept, strict=True):
        tokens = [int(tree.tokens[n]) for n in [0, *path]] + after.tolist()
        assert torch.equal(nexts[slot].logits, fresh_logits(target, context, tokens)[-2:]), len(context)
        with pytest.raises(ValueError, match="committed tokens before a path"):
            slot.compact(slot.cached_len - 1, [slot.cached_len])  # a gap, then a slot past the cache
        slot.end()
    assert sorted(batched.free_seqs) == [0, 1, 2]


def test_long_prompt_joins_a_part_per_step_while_the_batch_decodes(drafter: LoadedModel) -> None:
    """Chunked prefill: a 1,100-token prompt joins a running batch one 512-token `llama_decode` per
    step while a running sequence decodes a token in each of those steps; both sequences' logits equal
    their own decoding alone, bit for bit (the prompt's calls are the ones plain decoding makes)."""
    short, long = context_ids(4, 40), context_ids(5, 1100)
    runner = drafter.new_runner()
    short_rows = [runner.forward(short, 1)[0]]
    fed = [int(short_rows[-1].argmax())]
    for _ in range(4):
        short_rows.append(runner.forward(torch.tensor(fed[-1:]), 1)[0])
        fed.append(int(short_rows[-1].argmax()))
    long_alone = drafter.new_runner().forward(long, 1)
    batched = drafter.new_batched_target(max_batch=2)
    short_slot, long_slot = batched.slot(), batched.slot()
    batched.run({short_slot: (joined := Forward(short, 1, None))})
    assert torch.equal(joined.logits[0], short_rows[0])
    prompt, parts = Forward(long, 1, None), 0
    while prompt.logits is None:
        step = Forward(torch.tensor([fed[parts]]), 1, None)
        batched.run({short_slot: step, long_slot: prompt})
        parts += 1
        assert torch.equal(step.logits[0], short_rows[parts])  # the running sequence went on
    assert parts == 3 and torch.equal(prompt.logits, long_alone)
    assert batched.cached_len(long_slot) == 1100 and batched.cached_len(short_slot) == 40 + parts
    for slot in (short_slot, long_slot):
        slot.end()
    assert sorted(batched.free_seqs) == [0, 1]


def test_concurrent_requests_with_a_long_prompt_equal_plain_decoding(drafter: LoadedModel) -> None:
    """Threads through the step barrier: a request whose prompt joins in parts and a short one, decoded
    concurrently in one batch (the 0.5B as target), each give plain decoding's tokens."""
    long_prompt = " ".join([PROMPTS[1]] * 30)  # about 700 tokens: two prompt calls
    assert len(drafter.tokenizer(long_prompt).input_ids) > 512
    plain = Engine.from_models(EngineConfig(target=DRAFTER, method="ar"), drafter, {})
    requests = [
        GenerationRequest(long_prompt, max_new_tokens=12),
        GenerationRequest(PROMPTS[0], max_new_tokens=24),
    ]
    expected = [plain.generate(request).token_ids for request in requests]
    config = EngineConfig(target=DRAFTER, method="chain", drafters=("prompt-lookup",), gamma=3, max_batch=2)
    engine = Engine.from_models(config, drafter, {})
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(engine.generate, requests))
    assert [r.token_ids for r in results] == expected


def test_concurrent_requests_batched_equal_plain_decoding(target: LoadedModel, drafter: LoadedModel) -> None:
    """Requests decoded concurrently through one batched llama.cpp target (plain decoding, prompt lookup
    chains, trees of the 0.5B and prompt lookup, fixed and self-tuning, and the methods mixed in one
    batch) each give the tokens of plain llama.cpp decoding alone."""
    plain = Engine.from_models(EngineConfig(target=TARGET, method="ar"), target, {})
    tree_drafters = (DRAFTER, "prompt-lookup")
    configs = [
        EngineConfig(target=TARGET, method="ar", max_batch=3),
        EngineConfig(target=TARGET, method="chain", drafters=("prompt-lookup",), gamma=3, max_batch=3),
        EngineConfig(target=TARGET, method="chain", drafters=("prompt-lookup",), max_batch=3),
        EngineConfig(target=TARGET, method="tree", drafters=tree_drafters, gamma=3, max_batch=3),
        EngineConfig(target=TARGET, method="tree", drafters=tree_drafters, max_batch=3),
    ]
    requests = [GenerationRequest(prompt, max_new_tokens=24) for prompt in PROMPTS[:3]]
    expected = [plain.generate(request).token_ids for request in requests]
    draft_models = {DRAFTER: drafter}
    for config in configs:
        engine = Engine.from_models(config, target, draft_models)  # measures batched costs if auto, once
        assert engine.batched is not None
        steps_before = engine.batched.steps
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(engine.generate, requests))
        assert [r.token_ids for r in results] == expected, config
        assert engine.batched.steps - steps_before < sum(len(t) for t in expected)  # forwards shared
    # Methods mixed in one batch: plain decoding, a fixed chain and a fixed tree share every forward.
    shared = target.new_batched_target(3)
    engines = [Engine.from_models(configs[i], target, draft_models, batched=shared) for i in (0, 1, 3)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda e, r: e.generate(r), engines, requests))
    assert [r.token_ids for r in results] == expected
    assert 0 < shared.steps < sum(len(t) for t in expected)
