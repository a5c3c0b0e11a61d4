"""Every contender on tiny random models: swarmspec methods and the real `transformers` baselines agree
token for token under greedy decoding, their counters add up, and a broken verifier shows in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import swarmspec.engine
from swarmspec.bench.contenders import Contender, Outcome, build_contenders, hf_generation_config
from swarmspec.bench.order import balanced_order
from swarmspec.bench.questions import Question
from swarmspec.bench.report import OVERALL, summarize
from swarmspec.bench.run import reference_contender, time_contenders
from swarmspec.config import HF_BASELINES, METHODS, MODEL_FREE_DRAFTERS, ONE_DRAFTER_METHODS, EngineConfig
from swarmspec.models.loading import LoadedModel
from swarmspec.sampling import SamplingConfig
from swarmspec.tree import TokenTree
from swarmspec.verify import Verdict

from tiny_models import EOS, VOCAB, tiny_loaded


def contenders_for(
    methods: Sequence[str],
    baselines: Sequence[str],
    target: LoadedModel,
    draft_model: LoadedModel,
    gamma: int,
) -> list[Contender]:
    """Every method with the tiny drafter (tree and vote also with both model-free drafters)."""
    configs = [
        (
            method,
            EngineConfig(
                target=target.spec,
                method=method,
                drafters=(draft_model.spec,)
                if method in ONE_DRAFTER_METHODS
                else (draft_model.spec, *MODEL_FREE_DRAFTERS),
                gamma=gamma,
            ),
        )
        for method in methods
    ]
    return build_contenders(configs, baselines, target, {draft_model.spec: draft_model}, draft_model)


def prompts(count: int, length: int = 12) -> list[tuple[Question, list[int]]]:
    generator = torch.Generator().manual_seed(count)
    return [
        (Question(str(i), "code" if i % 2 else "rag", "code" if i % 2 else "rag", "-"),
         torch.randint(2, VOCAB, (length,), generator=generator).tolist())
        for i in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("drafter_seed", [0, 5], ids=["agreeing-drafter", "random-drafter"])
def test_all_contenders_greedy_identical_to_hf_generate(drafter_seed: int) -> None:
    target = tiny_loaded("tiny-target", seed=0)
    draft_model = tiny_loaded("tiny-drafter", seed=drafter_seed, layers=2 if drafter_seed == 0 else 1)
    contenders = contenders_for(METHODS, HF_BASELINES, target, draft_model, gamma=4)
    assert [c.name for c in contenders] == [*METHODS, *HF_BASELINES]
    greedy = SamplingConfig()
    records = time_contenders(
        contenders, prompts(4), repeats=2, max_new_tokens=30, sampling=greedy, seed=0, progress=False
    )
    assert len(records) == 4 * 2 * len(contenders)
    rows = {(r.contender, r.family): r for r in summarize(records, "hf-generate", greedy=True)}
    assert all(row.identical for row in rows.values()), [r for r in rows.values() if not r.identical]

    for r in records:
        if r.contender in ("ar", "hf-generate"):
            assert (r.target_forwards, r.drafted_tokens, r.accepted_tokens) == (r.new_tokens, 0, 0)
        assert 0 <= r.accepted_tokens <= r.drafted_tokens
        assert r.new_tokens == r.target_forwards + r.accepted_tokens  # each forward adds one own token
    for r in records:  # every accepted token of a method is credited to one of its drafters
        if r.contender in METHODS and r.contender != "ar":
            assert sum(r.accepted_by_drafter.values()) == r.accepted_tokens
    chain, assisted = rows["chain", OVERALL], rows["hf-assisted", OVERALL]
    assert assisted.acceptance_rate is not None and chain.acceptance_rate is not None
    if drafter_seed == 0:  # the drafter is the target: everything drafted is accepted
        assert chain.acceptance_rate == 1.0 and chain.mean_accepted_tokens > 4
        assert assisted.acceptance_rate == 1.0


def accept_every_draft_token(tree: TokenTree, target_logits: torch.Tensor, generator) -> Verdict:
    """A deliberately broken verifier: it trusts the drafter completely."""
    return Verdict(list(range(1, len(tree))), int(target_logits[-1].argmax()))


def test_broken_verifier_shows_as_not_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarmspec.engine, "make_verifier", lambda sampling: accept_every_draft_token)
    target, draft_model = tiny_loaded("tiny-target", seed=0), tiny_loaded("tiny-drafter", seed=5, layers=1)
    contenders = contenders_for(["chain"], ["hf-generate"], target, draft_model, gamma=4)
    greedy = SamplingConfig()
    records = time_contenders(
        contenders, prompts(2), repeats=1, max_new_tokens=20, sampling=greedy, seed=0, progress=False
    )
    chain = {r.family: r for r in summarize(records, "hf-generate", greedy=True) if r.contender == "chain"}
    assert chain[OVERALL].identical is False


def test_sampling_runs_every_contender_with_seeded_outputs() -> None:
    target, draft_model = tiny_loaded("tiny-target", seed=0), tiny_loaded("tiny-drafter", seed=0)
    contenders = contenders_for(METHODS, HF_BASELINES, target, draft_model, gamma=3)
    sampling = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)
    runs = [
        time_contenders(contenders, prompts(2), repeats=1, max_new_tokens=16, sampling=sampling, seed=7,
                        progress=False)
        for _ in range(2)
    ]  # fmt: skip
    # Same seed, same draws, for contenders without learned state: tree and vote learn across requests
    # (suffix history, vote weights), which changes their drafts and so their draws, not the distribution.
    stateless = {"ar", "chain", *HF_BASELINES}
    assert [r.token_ids for r in runs[0] if r.contender in stateless] == [
        r.token_ids for r in runs[1] if r.contender in stateless
    ]
    assert all(row.identical is None for row in summarize(runs[0], "hf-generate", greedy=False))


def test_hf_generation_config_spells_out_the_decoding_rule() -> None:
    greedy = hf_generation_config(SamplingConfig(), 64, [EOS], 0)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.repetition_penalty) == (False, 64, 1.0)
    sampled = hf_generation_config(SamplingConfig(temperature=0.7, top_k=0, top_p=0.9), 8, [EOS], 0)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.7, 0, 0.9)


def test_reference_is_hf_generate_else_ar() -> None:
    assert reference_contender(["chain", "ar", "hf-generate"]) == "hf-generate"
    assert reference_contender(["chain", "ar"]) == "ar"
    assert reference_contender(["chain"]) is None


class Recorder(Contender):
    """Generates nothing; notes when it ran."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name)
        self.log = log

    def generate(self, prompt_ids, max_new_tokens, sampling, seed) -> Outcome:
        self.log.append(self.name)
        return Outcome([1], 0.01, 1, 0, 0, 0, 0)


def test_contenders_run_in_a_balanced_order_and_records_keep_theirs() -> None:
    log: list[str] = []
    contenders = [Recorder(name, log) for name in "abc"]
    records = time_contenders(
        contenders, prompts(3), repeats=2, max_new_tokens=1, sampling=SamplingConfig(), seed=0, progress=False
    )
    timed = log[len(contenders) :]  # after each contender's untimed warm-up
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert rounds == [["abc"[i] for i in balanced_order(3, r)] for r in range(6)]
    assert [r.contender for r in records] == list("abc") * 6
    assert [(r.question_id, r.repeat) for r in records[::3]] == [
        (q.question_id, repeat) for q, _ in prompts(3) for repeat in (0, 1)
    ]
