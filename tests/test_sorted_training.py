"""Sorted fine-tuning: the exits learn the targets' answers, deterministically, resumably, and are
stored where `sorted:` drafters find them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarmspec.cli import main
from swarmspec.errors import InvalidRequestError, SwarmspecError
from swarmspec.models.sorted import SortedExits, sorted_exits, trained_exit_norm, trained_exits_path
from swarmspec.train.sorted import (
    Answer,
    evaluate,
    exit_features,
    token_frequency_order,
    train_exits,
    tune_cascade,
    tune_threshold,
    tune_thresholds,
)

from tiny_models import run_decode, tiny_loaded, tiny_qwen2

EXITS = (1, 2, 4)


def answers() -> list[Answer]:
    """A tiny target's greedy answers to a few prompts."""
    target = tiny_qwen2(5, layers=2)
    prompts = [[3 + i, 10 + 2 * i, 40 + i, 7] for i in range(8)]
    return [Answer("tiny", str(i), p, run_decode(target, None, p, 24)[0]) for i, p in enumerate(prompts)]


def trained(epochs: int, checkpoint: Path | None = None) -> tuple[SortedExits, list[float]]:
    model = tiny_qwen2(9, layers=4)
    exits = SortedExits(model, EXITS, rank=4, seed=1)
    features = exit_features(model, EXITS, answers())
    losses = train_exits(
        exits, model, features, epochs=epochs, batch_rows=32, learning_rate=0.03, seed=0,
        checkpoint=checkpoint, progress=lambda _: None,
    )  # fmt: skip
    return exits, losses


def test_features_are_the_exit_hidden_states_of_the_answer_positions() -> None:
    model, data = tiny_qwen2(9, layers=4), answers()[:2]
    features = exit_features(model, EXITS, data)
    assert features.labels.tolist() == data[0].output_ids + data[1].output_ids
    exits = SortedExits(model, EXITS)  # untrained: exit j is the truncated model
    ids = data[0].prompt_ids + data[0].output_ids
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    first = len(data[0].prompt_ids) - 1
    torch.testing.assert_close(  # the deepest exit predicts the first answer token as the model does
        exits.logits(model, 2, features.hidden[2][0]), out.logits[0, first], atol=1e-4, rtol=0
    )


def test_training_lowers_the_loss_and_raises_acceptance_deterministically() -> None:
    model = tiny_qwen2(9, layers=4)
    features = exit_features(model, EXITS, answers())
    before = evaluate(SortedExits(model, EXITS, rank=4, seed=1), model, features)
    exits, losses = trained(epochs=6)
    after = evaluate(exits, model, features)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0]
    for b, a in zip(before[:-1], after[:-1], strict=True):
        assert a.loss < b.loss and a.acceptance > b.acceptance, (b, a)
    assert after[-1] == before[-1]  # the exit after all 4 layers is the model itself: not trained
    assert trained(epochs=6)[1] == losses  # same seed, same run


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    trained(epochs=2, checkpoint=checkpoint)  # "interrupted" after epoch 2 of 4
    resumed, resumed_losses = trained(epochs=4, checkpoint=checkpoint)
    whole, whole_losses = trained(epochs=4)
    assert resumed_losses == pytest.approx(whole_losses)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_saved_exits_are_what_sorted_drafters_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    exits, _ = trained(epochs=1)
    model = tiny_qwen2(9, layers=4)
    assert not sorted_exits(model, EXITS).trained_on  # nothing stored yet: untrained exits
    exits.save(trained_exits_path(model, EXITS, exits.rank), {"targets": ["tiny"]})
    loaded = sorted_exits(model, EXITS)
    assert loaded.trained_on == {"targets": ["tiny"]} and loaded.rank == 4
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(model, 0, hidden), exits.logits(model, 0, hidden))


def test_drafters_load_the_highest_rank_and_llama_cpp_the_norm_of_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exits trained at the same depths with and without adapters are stored side by side: `sorted:`
    drafters take the adapters, llama.cpp's exit GGUFs (norm only) the rank-0 norm."""
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    model = tiny_qwen2(9, layers=4)
    checkpoint = str(model.config.name_or_path)
    with_adapters = trained(epochs=1)[0]
    norms_only = SortedExits(model, EXITS, rank=0)
    with torch.no_grad():
        norms_only.norms[1].weight.mul_(3.0)
    with_adapters.save(trained_exits_path(model, EXITS, 4), {"targets": ["adapters"]})
    assert trained_exit_norm(checkpoint, 2) is None  # rank 4 only: no exit llama.cpp can run
    norms_only.save(trained_exits_path(model, EXITS, 0), {"targets": ["norms"]})
    assert sorted_exits(model, (2,)).trained_on == {"targets": ["adapters"]}
    torch.testing.assert_close(trained_exit_norm(checkpoint, 2), norms_only.norms[1].weight)
    assert trained_exit_norm(checkpoint, 3) is None  # no exit stored at 3 layers


@pytest.mark.parametrize("name", ["exits-1-2-4-rank4.pt", "exits-1-2-4.pt"])
def test_a_corrupt_stored_exits_file_gives_a_clear_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt or foreign files where trained exits are stored (named with their rank, or as before
    the rank was part of the name) say which file to delete."""
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    model = tiny_qwen2(9, layers=4)
    path = trained_exits_path(model, EXITS, 4).with_name(name)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(SwarmspecError, match=f"cannot load trained sorted exits from {path}: .*delete it"):
        sorted_exits(model, (2,))
    torch.save({"something": "else"}, path)
    with pytest.raises(SwarmspecError, match="lacks the exits' depths, rank or weights"):
        sorted_exits(model, (2,))


def test_train_sorted_command_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny checkpoint drafting for itself (self-speculation): answers, training, report, storage."""
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path / "cache"))
    loaded = tiny_loaded("tiny", 3, layers=4)
    checkpoint = tmp_path / "tiny"
    loaded.model.save_pretrained(checkpoint)
    loaded.tokenizer.save_pretrained(checkpoint)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"question_id": i, "category": "qa", "turns": [f"t{i} t{i + 5} t{i + 9}"]} for i in range(6)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    args = [
        "train-sorted",
        "--drafter",
        str(checkpoint),
        "--target",
        str(checkpoint),
        "--prompts",
        str(prompts),
    ]
    flags = [
        "--sorted-exits",
        "2,4",
        "--rank",
        "4",
        "--max-new-tokens",
        "12",
        "--epochs",
        "3",
        "--held-out",
        "0.34",
    ]
    assert main([*args, *flags, "--learning-rate", "0.01"]) == 0
    out, err = capsys.readouterr()
    assert "| 2 | " in out and "| 4 | " in out and "acceptance after" in out
    assert "epoch 3/3" in err and "answered 6/6 prompts" in err
    assert "Tuned exit thresholds" in out and f"- {checkpoint}: exit 2: " in out
    assert "-token head |" in out
    stored = Path(out.strip().splitlines()[-1].removeprefix("exits: "))
    assert stored.is_file() and stored.name == "exits-2-4-rank4.pt"
    assert main([*args, *flags, "--learning-rate", "0"]) == 2
    assert "learning rate must be > 0" in capsys.readouterr().err


def test_threshold_tuning_on_synthetic_confidences() -> None:
    confidence = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    correct = torch.tensor([True, True, True, False, True, False, False, False])
    # Right 4 of the top 5 (0.8): the lowest threshold keeping 80% is 0.6; 100% needs 0.8.
    assert tune_threshold(confidence, correct, 0.8) == pytest.approx(0.6)
    assert tune_threshold(confidence, correct, 1.0) == pytest.approx(0.8)
    assert tune_threshold(confidence, correct, 0.5) == pytest.approx(0.3)  # 4 of 8 overall
    assert tune_threshold(confidence, torch.zeros(8, dtype=torch.bool), 0.5) == 1.0  # never right: never


def test_thresholds_are_tuned_in_cascade() -> None:
    """Rows 0-3 are easy, 4-7 hard; the deepest exit is right on all but row 7 (7 of 8). Exit 0 is right
    on the easy rows (precision 1 down to 0.8, then 4 of 5): 0.8. Exit 1 then sees rows 4-7 only, where
    the deepest is right 3 of 4 times: it is right on its top two (0.7, 0.6), then 2 of 3: 0.6. Tuned on
    every row instead, exit 1 would also count the easy rows it never sees and stop at 0.5."""
    confidence = [
        torch.tensor([0.95, 0.9, 0.85, 0.8, 0.3, 0.25, 0.2, 0.15]),
        torch.tensor([0.5, 0.5, 0.5, 0.5, 0.7, 0.6, 0.4, 0.35]),
    ]
    correct = [torch.tensor([True] * 4 + [False] * 4), torch.tensor([True] * 6 + [False] * 2)]
    deepest = torch.tensor([True] * 7 + [False])
    assert tune_cascade(confidence, correct, deepest) == pytest.approx([0.8, 0.6])
    assert tune_threshold(confidence[1], correct[1], 7 / 8) == pytest.approx(0.5)
    # Exit 0 answers every row: nothing is left for exit 1, which never answers.
    sure, right = torch.tensor([0.9, 0.8]), torch.ones(2, dtype=torch.bool)
    assert tune_cascade([sure, torch.tensor([0.3, 0.2])], [right, right], right) == pytest.approx([0.8, 1.0])


def test_tuned_thresholds_are_stored_per_target_and_used_by_exit_subsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    exits, _ = trained(epochs=3)
    model = tiny_qwen2(9, layers=4)
    tuned = tune_thresholds(exits, model, exit_features(model, EXITS, answers()))
    assert set(tuned) == {"tiny"} and set(tuned["tiny"]) == {"1", "2"}
    exits.save(trained_exits_path(model, EXITS, exits.rank), {"thresholds": tuned})
    loaded = sorted_exits(model, EXITS)
    assert loaded.tuned_thresholds("tiny") == (tuned["tiny"]["1"], tuned["tiny"]["2"])
    assert loaded.tuned_thresholds("llamacpp:other") is None
    # Exit 2 alone, from the exits trained at 1, 2 and 4 layers; and 2 and 4 with exit 2's threshold.
    alone = sorted_exits(model, (2,))
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(alone.logits(model, 0, hidden), exits.logits(model, 1, hidden))
    assert sorted_exits(model, (2, 4)).tuned_thresholds("tiny") == (tuned["tiny"]["2"],)
    assert not sorted_exits(model, (3,)).trained_on  # no stored exit at 3 layers: untrained


def test_token_frequency_order() -> None:
    data = [Answer("a", "1", [0], [5, 3, 5, 9]), Answer("b", "2", [0], [3, 5, 7])]
    assert token_frequency_order(data).tolist() == [5, 3, 7, 9]  # 5 three times, 3 twice, then by id


def test_nothing_to_train_when_every_exit_is_the_whole_model() -> None:
    model = tiny_qwen2(9, layers=4)
    exits = SortedExits(model, (4,), rank=4)
    with pytest.raises(InvalidRequestError, match="nothing to train: exits \\[4\\] are all the whole model"):
        train_exits(
            exits,
            model,
            exit_features(model, (4,), answers()),
            epochs=1,
            batch_rows=8,
            learning_rate=0.1,
            seed=0,
        )
