"""Sorted fine-tuning (`swarmspec train-sorted`): train the exits of a sorted draft all at once.

The data are the targets' own greedy answers to a prompt set, so each exit learns to predict what the
targets say (the tokens it must draft to be accepted). The shared layers are frozen: each answer is
run through the draft model once, keeping the hidden states at every exit depth, and training only
runs the exits' own parts (models.sorted) and the shared LM head on them. The loss is the sum over the
shallow exits (an exit after every layer is the draft model itself and stays so) of the cross-entropy
with the target's next token (SortedNet/SoFT style), and an exit's
*acceptance* is how often its top token is the target's: what greedy drafting from it gets accepted.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from swarmspec.bench.questions import Question, load_questions, parse_questions
from swarmspec.config import EngineConfig, TrainSortedConfig
from swarmspec.engine import Engine, encode_prompt
from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import load_model, split_spec
from swarmspec.models.registry import cache_root
from swarmspec.models.sorted import SortedExits, decoder_layers, save_atomically, trained_exits_path
from swarmspec.sampling import SamplingConfig

Progress = Callable[[str], None]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Answer:
    """One target's greedy answer to one prompt, as token ids."""

    target: str
    question_id: str
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class Features:
    """Training rows: per exit the hidden states [N, H] of the positions that predict a target token,
    the tokens [N], and which target each row's answer came from."""

    hidden: list[torch.Tensor]
    labels: torch.Tensor
    targets: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ExitScore:
    depth: int
    target: str
    loss: float
    acceptance: float  # share of rows whose top exit token is the target's


def training_prompts(path: str | None) -> list[Question]:
    """A Spec-Bench-format file's questions, or the built-in training prompts (none of them is a
    benchmark question)."""
    if path is not None:
        return load_questions(path)
    text = resources.files("swarmspec.train").joinpath("prompts.jsonl").read_text("utf-8")
    return parse_questions(text.splitlines(), "built-in training prompts")


def vocabulary_checksum(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def target_answers(
    target_spec: str,
    questions: Sequence[Question],
    max_new_tokens: int,
    vocabulary: str,
    progress: Progress = log,
) -> list[Answer]:
    """The target's greedy answers, cached on disk by target, prompts and length; refused unless the
    target's vocabulary has the checksum `vocabulary` (the draft model's)."""
    key = json.dumps([target_spec, [q.prompt for q in questions], max_new_tokens])
    path = cache_root() / "sorted" / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        check_vocabulary(target_spec, cached["vocabulary"], vocabulary)
        return [Answer(**a) for a in cached["answers"]]
    target = load_model(target_spec)
    check_vocabulary(target_spec, vocabulary_checksum(target.tokenizer), vocabulary)
    engine = Engine.from_models(EngineConfig(target=target_spec, method="ar"), target, {})
    answers = []
    start = time.perf_counter()
    for i, question in enumerate(questions):
        prompt_ids = encode_prompt(target.tokenizer, question.prompt, chat=True)
        chunks = engine.token_chunks(prompt_ids, max_new_tokens, SamplingConfig(), 0, DecodeStats())
        answers.append(Answer(target_spec, question.question_id, prompt_ids, [t for c in chunks for t in c]))
        elapsed = time.perf_counter() - start
        progress(f"  {target_spec}: answered {i + 1}/{len(questions)} prompts ({elapsed:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"vocabulary": vocabulary, "answers": [asdict(a) for a in answers]}
    path.with_suffix(".partial").write_text(json.dumps(record))
    path.with_suffix(".partial").replace(path)
    return answers


def check_vocabulary(target_spec: str, target_vocabulary: str, drafter_vocabulary: str) -> None:
    if target_vocabulary != drafter_vocabulary:
        raise InvalidRequestError(
            f"{target_spec} does not share the draft model's vocabulary: a sorted draft can only learn "
            "to draft for targets of its own model family"
        )


@torch.inference_mode()
def exit_features(
    model: PreTrainedModel, depths: Sequence[int], answers: Sequence[Answer], progress: Progress | None = None
) -> Features:
    """Run each answer through the frozen draft model once; keep the hidden states at the exit depths
    of the positions that predict an answer token (the last prompt token's, then each answer token's
    but the last)."""
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layers[depth - 1].register_forward_hook(
            lambda _module, _args, output, depth=depth: captured.__setitem__(depth, output)
        )
        for depth in depths
    ]
    hidden: list[list[torch.Tensor]] = [[] for _ in depths]
    labels, targets = [], []
    try:
        for i, answer in enumerate(answers):
            if progress and i % 10 == 9:
                progress(f"  {i + 1}/{len(answers)} answers run")
            if not answer.output_ids:
                continue
            ids = answer.prompt_ids + answer.output_ids
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
            rows = slice(len(answer.prompt_ids) - 1, len(ids) - 1)
            for j, depth in enumerate(depths):
                output = captured[depth]
                hidden[j].append((output[0] if isinstance(output, tuple) else output)[0, rows].clone())
            labels.extend(answer.output_ids)
            targets.extend([answer.target] * len(answer.output_ids))
    finally:
        for hook in hooks:
            hook.remove()
    return Features([torch.cat(h) for h in hidden], torch.tensor(labels, dtype=torch.int64), targets)


def exit_losses(
    exits: SortedExits, model: PreTrainedModel, features: Features, rows: torch.Tensor
) -> list[torch.Tensor]:
    """Each trained (shallow) exit's per-row cross-entropy with the target's token on `rows`."""
    return [
        torch.nn.functional.cross_entropy(
            exits.logits(model, j, features.hidden[j][rows]), features.labels[rows], reduction="none"
        )
        for j in range(exits.shallow)
    ]


@dataclass
class ExitPredictions:
    """An exit's verdict on every row: cross-entropy with the target's token, top probability, top token."""

    loss: torch.Tensor  # [N]
    confidence: torch.Tensor  # [N]
    top: torch.Tensor  # [N]


@torch.no_grad()
def exit_predictions(
    exits: SortedExits,
    model: PreTrainedModel,
    features: Features,
    head_rows: torch.Tensor | None = None,
    batch_rows: int = 256,
) -> list[ExitPredictions]:
    """Every exit's predictions on every row (batched: the LM head is wide); with `head_rows` a shallow
    exit's top token and its probability are those of a draft head over these tokens only."""
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in exits.depths]
    for start in range(0, len(features), batch_rows):
        rows = torch.arange(start, min(start + batch_rows, len(features)))
        for j in range(len(exits.depths)):
            logits = exits.logits(model, j, features.hidden[j][rows])
            loss = torch.nn.functional.cross_entropy(logits, features.labels[rows], reduction="none")
            if head_rows is None or j >= exits.shallow:  # the whole-model exit keeps the full head
                confidence, top = torch.softmax(logits, -1).max(-1)
            else:
                confidence, index = torch.softmax(logits[:, head_rows], -1).max(-1)
                top = head_rows[index]
            parts[j].append((loss, confidence, top))
    return [ExitPredictions(*(torch.cat(column) for column in zip(*p, strict=True))) for p in parts]


def evaluate(
    exits: SortedExits, model: PreTrainedModel, features: Features, head_rows: torch.Tensor | None = None
) -> list[ExitScore]:
    """Per exit and target: mean cross-entropy and acceptance (top token == the target's; with
    `head_rows`, the top token of a draft head over those tokens)."""
    predictions = exit_predictions(exits, model, features, head_rows)
    scores = []
    for target, mine in rows_by_target(features).items():
        for depth, p in zip(exits.depths, predictions, strict=True):
            right = (p.top[mine] == features.labels[mine]).float()
            scores.append(ExitScore(depth, target, float(p.loss[mine].mean()), float(right.mean())))
    return scores


def rows_by_target(features: Features) -> dict[str, torch.Tensor]:
    return {t: torch.tensor([r == t for r in features.targets]) for t in dict.fromkeys(features.targets)}


def tune_threshold(confidence: torch.Tensor, correct: torch.Tensor, required: float) -> float:
    """The lowest top probability at which an exit's tokens are right at least `required` of the time
    over the rows it would answer (those at or above it); 1.0 if no threshold gets there. Tuned so, an
    exit answers only where it drafts as well as the deepest exit."""
    order = confidence.argsort(descending=True, stable=True)
    precision = correct[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
    reached = (precision >= required).nonzero()
    return float(confidence[order[int(reached[-1])]]) if len(reached) else 1.0


def tune_cascade(
    confidence: Sequence[torch.Tensor], correct: Sequence[torch.Tensor], deepest_correct: torch.Tensor
) -> list[float]:
    """Thresholds for exits tried in turn, as drafting tries them (the deepest answering the rest):
    exit j is tuned on the rows the exits before it leave unanswered, to be right there as often as the
    deepest exit is on those same rows."""
    remaining = torch.ones_like(deepest_correct, dtype=torch.bool)
    thresholds = []
    for exit_confidence, exit_correct in zip(confidence, correct, strict=True):
        if not remaining.any():
            thresholds.append(1.0)
            continue
        required = float(deepest_correct[remaining].double().mean())
        threshold = tune_threshold(exit_confidence[remaining], exit_correct[remaining], required)
        thresholds.append(threshold)
        remaining &= exit_confidence < threshold  # a token at or above it stops at this exit
    return thresholds


def tune_thresholds(
    exits: SortedExits, model: PreTrainedModel, features: Features
) -> dict[str, dict[str, float]]:
    """Per target model (name without backend prefix) and exit but the deepest: the exits' thresholds
    tuned in cascade on `features` (`tune_cascade`)."""
    predictions = exit_predictions(exits, model, features)
    tuned = {}
    for target, mine in rows_by_target(features).items():
        labels = features.labels[mine]
        shallow = predictions[:-1]
        thresholds = tune_cascade(
            [p.confidence[mine] for p in shallow],
            [p.top[mine] == labels for p in shallow],
            predictions[-1].top[mine] == labels,
        )
        depths = exits.depths[:-1]
        tuned[split_spec(target)[1]] = {
            str(depth): round(threshold, 4) for depth, threshold in zip(depths, thresholds, strict=True)
        }
    return tuned


def train_exits(
    exits: SortedExits,
    model: PreTrainedModel,
    features: Features,
    *,
    epochs: int,
    batch_rows: int,
    learning_rate: float,
    seed: int,
    checkpoint: Path | None = None,
    progress: Progress = log,
) -> list[float]:
    """Train the shallow exits' own parameters on the sum of their losses (AdamW, shuffled batches).

    With `checkpoint`, the state after each epoch is saved there and a run finding one resumes after
    its last epoch, ending where an uninterrupted run would. Returns the mean loss of each epoch."""
    parameters = exits.trainable()
    if not parameters:
        raise InvalidRequestError(f"nothing to train: exits {list(exits.depths)} are all the whole model")
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    done, epoch_losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        exits.load_state_dict(saved["exits"])
        optimizer.load_state_dict(saved["optimizer"])
        done, epoch_losses = saved["epoch"], saved["losses"]
        progress(f"  resuming after epoch {done} of {epochs} ({checkpoint})")
    model.requires_grad_(False)  # gradients flow through the shared head to the exits, never into it
    try:
        for epoch in range(done, epochs):
            order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
            total, start = 0.0, time.perf_counter()
            shown = start
            for first in range(0, len(order), batch_rows):
                rows = order[first : first + batch_rows]
                loss = torch.stack([loss.mean() for loss in exit_losses(exits, model, features, rows)]).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
                if time.perf_counter() - shown >= 30:  # an epoch takes minutes on a CPU
                    shown = time.perf_counter()
                    done_rows = first + len(rows)
                    progress(
                        f"  epoch {epoch + 1}/{epochs}: {done_rows}/{len(order)} positions, "
                        f"loss {total / done_rows:.3f} so far ({shown - start:.0f} s)"
                    )
            epoch_losses.append(total / len(order))
            elapsed = time.perf_counter() - start
            progress(
                f"  epoch {epoch + 1}/{epochs}: loss {epoch_losses[-1]:.3f} (exits summed, {elapsed:.0f} s)"
            )
            if checkpoint is not None:
                state = {"exits": exits.state_dict(), "optimizer": optimizer.state_dict()}
                save_atomically({**state, "epoch": epoch + 1, "losses": epoch_losses}, checkpoint)
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
    return epoch_losses


def split_held_out(questions: Sequence[Question], share: float, seed: int) -> tuple[set[str], set[str]]:
    """Question ids for training and for measuring acceptance (at least one each)."""
    ids = [q.question_id for q in questions]
    random.Random(seed).shuffle(ids)
    held = max(1, round(len(ids) * share))
    if held >= len(ids):
        raise InvalidRequestError(f"need at least 2 prompts to train and measure, got {len(ids)}")
    return set(ids[held:]), set(ids[:held])


@dataclass(frozen=True)
class TrainingResult:
    path: Path  # the trained exits, where `sorted:` drafters find them
    epoch_losses: list[float]
    before: list[ExitScore]
    after: list[ExitScore]
    thresholds: dict[str, dict[str, float]]  # tuned: per target model and exit depth
    head_tokens: int  # the draft head measured in `after_head` (0: none)
    after_head: list[ExitScore]

    def markdown(self) -> str:
        head = f" | acceptance after, {self.head_tokens}-token head" if self.head_tokens else ""
        lines = [
            "| exit (layers) | target | loss before | loss after | acceptance before "
            f"| acceptance after{head} |",
            "|---|---|---|---|---|---|" + ("---|" if head else ""),
        ]
        for i, (b, a) in enumerate(zip(self.before, self.after, strict=True)):
            losses, acceptance = f"{b.loss:.3f} | {a.loss:.3f}", f"{b.acceptance:.1%} | {a.acceptance:.1%}"
            headed = f" | {self.after_head[i].acceptance:.1%}" if head else ""
            lines.append(f"| {b.depth} | {b.target} | {losses} | {acceptance}{headed} |")
        losses = ", ".join(f"{loss:.3f}" for loss in self.epoch_losses)
        tuned = [
            f"- {target}: " + ", ".join(f"exit {depth}: {t:g}" for depth, t in table.items())
            for target, table in self.thresholds.items()
        ]
        thresholds = "\n\nTuned exit thresholds (held-out prompts):\n" + "\n".join(tuned) if tuned else ""
        return (
            f"Training loss per epoch (sum over exits): {losses}\n\n" + "\n".join(lines) + thresholds + "\n"
        )


def token_frequency_order(answers: Sequence[Answer]) -> torch.Tensor:
    """The token ids of the answers, most frequent first (ties: lower id first)."""
    counts = torch.bincount(torch.tensor([t for a in answers for t in a.output_ids], dtype=torch.int64))
    seen = counts.nonzero().squeeze(1)
    return seen[torch.argsort(-counts[seen], stable=True)]


def train_sorted(config: TrainSortedConfig, progress: Progress = log) -> TrainingResult:
    """The whole job: the targets' answers, the draft's hidden states, training with checkpoints, the
    exits stored where `sorted:` drafters load them, and acceptance on held-out prompts before/after."""
    questions = training_prompts(config.prompts)
    train_ids, held_ids = split_held_out(questions, config.held_out, config.seed)
    drafter = load_model(config.drafter)
    model, vocabulary = drafter.hf_model, vocabulary_checksum(drafter.tokenizer)
    answers: list[Answer] = []
    for target in config.targets:
        progress(f"answers of {target} to {len(questions)} prompts, {config.max_new_tokens} tokens each")
        answers.extend(target_answers(target, questions, config.max_new_tokens, vocabulary, progress))
    progress(f"hidden states of {config.drafter} at layers {list(config.exits)}")
    train = exit_features(model, config.exits, [a for a in answers if a.question_id in train_ids], progress)
    held = exit_features(model, config.exits, [a for a in answers if a.question_id in held_ids], progress)
    exits = SortedExits(model, config.exits, config.rank, config.seed)
    exits.head_order = token_frequency_order([a for a in answers if a.question_id in train_ids])
    before = evaluate(exits, model, held)
    path = trained_exits_path(model, config.exits, config.rank)
    settings = {**asdict(config), "prompts": config.prompts or "built-in"}
    run_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    checkpoint = path.with_name(f"{path.stem}-run-{run_key}.ckpt")
    if config.restart:
        checkpoint.unlink(missing_ok=True)
    progress(f"training {exits.shallow} exits on {len(train)} positions ({len(held)} held out)")
    epoch_losses = train_exits(
        exits,
        model,
        train,
        epochs=config.epochs,
        batch_rows=config.batch_rows,
        learning_rate=config.learning_rate,
        seed=config.seed,
        checkpoint=checkpoint,
        progress=progress,
    )
    after = evaluate(exits, model, held)
    acceptance = {f"{score.depth}:{score.target}": score.acceptance for score in after}
    thresholds = tune_thresholds(exits, model, held) if config.tune_thresholds else {}
    exits.save(path, {**settings, "held_out_acceptance": acceptance, "thresholds": thresholds})
    checkpoint.unlink(missing_ok=True)
    head_tokens = min(config.head_tokens, len(exits.head_order))
    after_head = evaluate(exits, model, held, exits.head_order[:head_tokens]) if head_tokens else []
    return TrainingResult(path, epoch_losses, before, after, thresholds, head_tokens, after_head)
