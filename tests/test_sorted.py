"""Sorted drafts (S2D): exits equal truncated models, lazily completed caches equal full forwards, and
drafting from the exits keeps decoding exactly the target's."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from swarmspec.cli import main
from swarmspec.config import AUTO, EngineConfig, Gamma, SortedDraft
from swarmspec.drafters.sorted import SortedDrafter, plan_exits
from swarmspec.engine import Engine, SharedLearning, build_drafters
from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import LoadedModel, pack_linears_onednn
from swarmspec.models.sorted import SortedExits, trained_exits_path
from swarmspec.policy import StepCosts
from swarmspec.runners.sorted import SortedRunner
from swarmspec.sampling import SamplingConfig

from tiny_models import VOCAB, run_decode, tiny_loaded, tiny_qwen2

EXITS = (1, 2, 4)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return tiny_qwen2(11, layers=4)


def truncated(model: Qwen2ForCausalLM, layers: int) -> Qwen2ForCausalLM:
    """The model's first `layers` layers, final norm and head, built independently of the sorted code."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    small = Qwen2ForCausalLM(config).eval()
    small.load_state_dict(model.state_dict(), strict=False)  # the deeper layers' weights are left out
    return small


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.mark.parametrize("exit_index", range(len(EXITS)))
def test_each_exit_equals_the_truncated_model(model: Qwen2ForCausalLM, exit_index: int) -> None:
    ids = tokens(24)
    with torch.no_grad():
        expected = truncated(model, EXITS[exit_index])(torch.tensor([ids])).logits[0]  # [n, V]
    runner = SortedRunner(model, SortedExits(model, EXITS))
    runner.extend(ids[:6])
    got = [runner.exit_logits(exit_index)]
    for token in ids[6:]:
        runner.extend([token])
        got.append(runner.exit_logits(exit_index))
    torch.testing.assert_close(torch.stack(got), expected[5:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_lazily_completed_cache_equals_a_full_forward(model: Qwen2ForCausalLM, seed: int) -> None:
    """Tokens exit at random depths, with rollbacks between; the deepest exit then needs every layer's
    keys and values of every token, completed on the way, and must equal the whole model's logits."""
    rng = random.Random(seed)
    ids = tokens(40, seed)
    runner = SortedRunner(model, SortedExits(model, EXITS))
    runner.extend(ids[:4])
    runner.exit_logits(rng.randrange(len(EXITS)))
    given = 4
    while given < len(ids):
        if rng.random() < 0.2:  # a rejected draft: forget a few tokens, then give them again
            given = max(1, given - rng.randrange(1, 5))
            runner.rollback(given)
        step = min(rng.randrange(1, 4), len(ids) - given)
        runner.extend(ids[given : given + step])
        given += step
        exit_index = rng.randrange(len(EXITS))
        logits = runner.exit_logits(exit_index)
        with torch.no_grad():
            expected = truncated(model, EXITS[exit_index])(torch.tensor([ids[:given]])).logits[0, -1]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert runner.cached_len == len(ids)


def test_an_exit_asked_twice_for_one_token_is_an_error(model: Qwen2ForCausalLM) -> None:
    runner = SortedRunner(model, SortedExits(model, EXITS))
    runner.extend(tokens(5))
    runner.exit_logits(1)
    with pytest.raises(ValueError, match="extend first"):
        runner.exit_logits(0)


def sorted_drafter(
    model: Qwen2ForCausalLM, thresholds: tuple[float, ...], prune_exits: bool = False
) -> SortedDrafter:
    return SortedDrafter(SortedRunner(model, SortedExits(model, EXITS)), thresholds, prune_exits)


@pytest.mark.parametrize(
    "thresholds", [(0.0, 0.0), (0.3, 0.6), (1.0, 1.0)], ids=["first", "adaptive", "last"]
)
@pytest.mark.parametrize("seed", range(4))
def test_sorted_drafting_decodes_exactly_the_target(thresholds: tuple[float, ...], seed: int) -> None:
    target = tiny_qwen2(seed, layers=2)
    prompt = tokens(7, seed)
    plain, _ = run_decode(target, None, prompt, 40)
    # A sorted draft of another model, and the target's own exits (self-speculation).
    for draft_model in (tiny_qwen2(100 + seed, layers=4), target):
        drafter = SortedDrafter(SortedRunner(draft_model, SortedExits(draft_model, (1, 2))), thresholds[:1])
        speculative, stats = run_decode(target, drafter, prompt, 40, gamma=3)
        assert speculative == plain
        assert sum(drafter.exit_counts) == stats.drafted_tokens


def test_thresholds_choose_the_exit(model: Qwen2ForCausalLM) -> None:
    prompt, sampling = tokens(6), SamplingConfig()
    first, last = sorted_drafter(model, (0.0, 0.0)), sorted_drafter(model, (1.0, 1.0))
    first.propose(prompt, 5, sampling, None)
    last.propose(prompt, 5, sampling, None)
    assert first.exit_counts == [5, 0, 0]
    assert last.exit_counts == [0, 0, 5]  # a top probability of 1.0 never happens here
    assert last.propose(prompt, 5, sampling, None).tokens.tolist() == greedy_chain(model, prompt, 5)


def greedy_chain(model: Qwen2ForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_deepest_exit_of_the_target_itself_is_always_accepted() -> None:
    target = tiny_qwen2(3, layers=2)
    drafter = SortedDrafter(SortedRunner(target, SortedExits(target, (1, 2))), (1.0,))
    _, stats = run_decode(target, drafter, tokens(5), 30, gamma=4)
    assert stats.accepted_tokens == stats.drafted_tokens > 0


def test_exits_must_fit_the_model(model: Qwen2ForCausalLM) -> None:
    with pytest.raises(InvalidRequestError, match="has 4 layers: exits \\[2, 6\\] do not fit"):
        SortedExits(model, (2, 6))


def test_sorted_settings_are_checked() -> None:
    assert SortedDraft().thresholds_given(None) == (0.5, 0.5, 0.5)
    assert SortedDraft().thresholds_given((0.3, 0.4, 0.9)) == (0.3, 0.4, 0.9)  # tuned for the target
    assert SortedDraft(thresholds=(0.1, 0.2, 0.3)).thresholds_given((0.3, 0.4, 0.9)) == (0.1, 0.2, 0.3)
    with pytest.raises(InvalidRequestError, match="increasing layer counts"):
        SortedDraft(exits=(12, 6))
    with pytest.raises(
        InvalidRequestError, match="one exit threshold in \\[0, 1\\] per exit but the deepest"
    ):
        SortedDraft(exits=(6, 12, 24), thresholds=(0.5,))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sorted-exits", "12,6"], "sorted exits must be increasing layer counts"),
        (["--exit-thresholds", "0.5,1.5,0.5"], "one exit threshold in [0, 1]"),
        (["--workers", "ray", "--method", "dsi"], "sorted drafts run with --workers threads"),
    ],
)
def test_bad_sorted_flags_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--drafter", "sorted:qwen2.5-coder-0.5b-instruct", "--max-new-tokens", "1", "hi"]
    assert main([*args[:-1], *flags, args[-1]]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("gamma", [3, AUTO])
@pytest.mark.parametrize("method", ["chain", "tree", "vote", "dsi"])
def test_the_engine_drafts_with_a_sorted_spec(method: str, gamma: Gamma) -> None:
    target, draft = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-drafter", 7, layers=3)
    sorted_spec = "sorted:tiny-drafter"
    sorted_model = LoadedModel(sorted_spec, draft.model, draft.tokenizer)
    drafters = (sorted_spec,) if method in ("chain", "dsi") else (sorted_spec, "prompt-lookup")

    def generate(method: str, drafters: tuple[str, ...], stats: DecodeStats | None = None) -> list[int]:
        config = EngineConfig(
            target=target.spec,
            method=method,
            drafters=drafters,
            sorted_draft=SortedDraft(exits=(1, 3), thresholds=(0.4,)),
            gamma=gamma,
        )
        costs = StepCosts({1: 30.0, 2: 40.0, 32: 340.0}, tuple(2.0 for _ in drafters))
        engine = Engine.from_models(config, target, {sorted_spec: sorted_model}, costs=costs)
        prompt = [5, 9, 14, 5, 9, 20, 33]
        chunks = engine.token_chunks(prompt, 30, SamplingConfig(), 0, stats or DecodeStats())
        return [t for chunk in chunks for t in chunk]

    stats = DecodeStats()
    assert generate(method, drafters, stats) == generate("ar", ())
    assert stats.drafted_tokens > 0 or method == "dsi"  # DSI's plain lanes may overtake every draft
    depth = stats.totals().mean_exit_depth  # the layers each drafted token ran: exit 1 or 3
    assert depth is not None and 1 <= depth <= 3


def test_one_sorted_draft_serves_several_targets_with_their_own_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines, two targets, one loaded draft: each drafts with the thresholds tuned for its target
    and decodes exactly its target's output."""
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    draft = tiny_loaded("tiny-drafter", 7, layers=3)
    sorted_model = LoadedModel("sorted:tiny-drafter", draft.model, draft.tokenizer)
    tuned = {"target-a": {"1": 0.2}, "target-b": {"1": 0.9}}
    SortedExits(draft.model, (1, 3)).save(trained_exits_path(draft.model, (1, 3), 0), {"thresholds": tuned})
    for name, seed, threshold in [("target-a", 1, 0.2), ("target-b", 2, 0.9)]:
        target = tiny_loaded(name, seed)
        config = EngineConfig(
            target=name, drafters=(sorted_model.spec,), sorted_draft=SortedDraft(exits=(1, 3)), gamma=3
        )
        (drafter,) = build_drafters(config, target, {sorted_model.spec: sorted_model}, SharedLearning(), 0)
        assert isinstance(drafter, SortedDrafter) and drafter.runner.model is draft.model
        assert drafter.thresholds == (threshold, 0.0)
        engine = Engine.from_models(config, target, {sorted_model.spec: sorted_model})
        plain = Engine.from_models(EngineConfig(target=name, method="ar"), target, {})
        assert engine_tokens(engine) == engine_tokens(plain)


def engine_tokens(engine: Engine, prompt: tuple[int, ...] = (5, 9, 14, 5, 9, 20, 33)) -> list[int]:
    chunks = engine.token_chunks(list(prompt), 30, SamplingConfig(), 0, DecodeStats())
    return [t for chunk in chunks for t in chunk]


def test_a_draft_head_drafts_only_its_tokens_and_decodes_exactly() -> None:
    target, draft_model = tiny_qwen2(2, layers=2), tiny_qwen2(8, layers=4)
    exits = SortedExits(draft_model, (1, 4))
    with pytest.raises(InvalidRequestError, match="needs exits trained by `swarmspec train-sorted`"):
        exits.restrict_head(draft_model, 16)
    exits.head_order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    exits.restrict_head(draft_model, 16)
    hidden = torch.randn(draft_model.config.hidden_size)
    with torch.no_grad():
        full, drafted = exits.logits(draft_model, 0, hidden), exits.draft_logits(draft_model, 0, hidden)
    head = exits.head_order[:16]
    torch.testing.assert_close(drafted[head], full[head])
    assert torch.isneginf(drafted).sum() == VOCAB - 16
    with torch.no_grad():  # the deepest exit, the whole draft model, keeps the full head
        torch.testing.assert_close(
            exits.draft_logits(draft_model, 1, hidden), exits.logits(draft_model, 1, hidden)
        )
    drafter = SortedDrafter(SortedRunner(draft_model, exits), (0.5,))
    prompt = tokens(6, 3)
    speculative, stats = run_decode(target, drafter, prompt, 40, gamma=3)
    assert speculative == run_decode(target, None, prompt, 40)[0] and stats.drafted_tokens > 0
    shallow_only = SortedDrafter(SortedRunner(draft_model, exits), (0.0,))
    assert set(shallow_only.propose(prompt, 8, SamplingConfig(), None).tokens.tolist()) <= set(head.tolist())


def test_a_reused_cache_drafts_what_a_fresh_one_does(model: Qwen2ForCausalLM) -> None:
    """After drafts the target rejected, the drafter rolls back to what the new context shares and drafts
    exactly as a drafter starting from scratch on that context."""
    sampling, rng = SamplingConfig(), random.Random(4)
    reused = sorted_drafter(model, (0.3, 0.6))
    context = tokens(6, 5)
    for _ in range(12):
        drafted = reused.propose(context, 4, sampling, None).tokens.tolist()
        fresh = sorted_drafter(model, (0.3, 0.6)).propose(context, 4, sampling, None).tokens.tolist()
        assert drafted == fresh
        assert reused.runner.cached_len == len(reused.cached_ids)
        kept = rng.randrange(len(drafted))  # the target accepts a prefix, then says its own token
        context = [*context, *drafted[:kept], rng.randrange(VOCAB)]


def test_an_exit_is_tried_only_where_it_pays() -> None:
    """By hand, heads of 10 and segments of 5 (weights read). The deepest exit always answers (10 from
    its decision on). Exit 1: a token leaving it unanswered costs 5 + 10 = 15, so at a pass rate of 0.1
    it saves 1.5 for a head of 10: skipped. Exit 0: leaving it costs 5 + 15 = 20; at 0.6 it saves 12 > 10:
    tried; at 0.5 it saves 10, not more than its head: skipped."""
    assert plan_exits([0.6, 0.1, 1.0], [10, 10, 10], [5, 5, 5]) == ([True, False, True], 23)
    assert plan_exits([0.5, 0.1, 1.0], [10, 10, 10], [5, 5, 5])[0] == [False, False, True]
    # A cheap head (a draft head) is worth trying at a low pass rate: 0.1 * 15 > 1.
    assert plan_exits([0.5, 0.1, 1.0], [1, 1, 10], [5, 5, 5])[0] == [True, True, True]
    # A token costs segment 0 (5), then exit 0's head (10) and, 40% of the time, 20 more: 23. Trying
    # every exit instead: 5 + 10 + 0.4 * (5 + 10 + 0.9 * (5 + 10)) = 26.4; the whole model 5 * 3 + 10 = 25.
    assert plan_exits([0.6, 0.1, 1.0], [10, 10, 10], [5, 5, 5], try_all=True)[1] == pytest.approx(26.4)


def test_pruned_exits_are_probed_and_change_the_cost_not_the_drafts(model: Qwen2ForCausalLM) -> None:
    """Shallow exits that never pass (threshold 1) soon stop being tried but for a probe every 16 tokens;
    the drafts stay those of the deepest exit. An exit that always passes (threshold 0) is always tried."""
    prompt, sampling = tokens(6), SamplingConfig()
    pruned = sorted_drafter(model, (1.0, 1.0), prune_exits=True)
    tried = [0, 0, 0]
    exit_logits = pruned.runner.exit_logits

    def counted(exit_index: int) -> torch.Tensor:
        tried[exit_index] += 1
        return exit_logits(exit_index)

    pruned.runner.exit_logits = counted  # type: ignore[method-assign]
    drafted = pruned.propose(prompt, 64, sampling, None).tokens.tolist()
    assert drafted == sorted_drafter(model, (1.0, 1.0)).propose(prompt, 64, sampling, None).tokens.tolist()
    assert tried[2] == 64 and pruned.exit_counts == [0, 0, 64]
    assert 0 < tried[0] <= 12 and 0 < tried[1] <= 12  # a few tries to learn, then probes
    assert 0.99 < pruned.cost_share() < 1.1  # the whole model, and a rare probe's head
    always = sorted_drafter(model, (0.0, 0.0), prune_exits=True)
    always.propose(prompt, 64, sampling, None)
    assert always.exit_counts == [64, 0, 0]
    segments, heads = always.runner.weights_read()
    # Nearly every token stops at exit 0: its segment and its head, of the whole model's weights.
    stop_at_first = (segments[0] + heads[0]) / (sum(segments) + heads[-1])
    assert always.cost_share() == pytest.approx(stop_at_first, rel=0.1)


def test_a_sorted_draft_on_onednn_packed_layers_counts_the_same_weights_and_decodes_exactly() -> None:
    """The `sorted:` variant packs the draft's layers for oneDNN and keeps its LM head (draft heads take
    its rows): the exits' costs count the packed weights, and drafting stays exact."""
    target, draft_model = tiny_qwen2(2, layers=2), tiny_qwen2(8, layers=4)
    plain_costs = SortedRunner(draft_model, SortedExits(draft_model, (1, 4))).weights_read()
    pack_linears_onednn(draft_model, keep=("lm_head",))
    assert isinstance(draft_model.lm_head, torch.nn.Linear)
    runner = SortedRunner(draft_model, SortedExits(draft_model, (1, 4)))
    assert runner.weights_read() == plain_costs
    prompt = tokens(6, 1)
    speculative, stats = run_decode(target, SortedDrafter(runner, (0.3,)), prompt, 40, gamma=3)
    assert speculative == run_decode(target, None, prompt, 40)[0] and stats.drafted_tokens > 0
