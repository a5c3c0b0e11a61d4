"""The engine: loaded models plus a decoding method, turning text requests into streamed text."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from swarmspec.config import AUTO, ORCHESTRATED_METHODS, ChatMessage, EngineConfig, GenerationRequest
from swarmspec.decode import decode
from swarmspec.drafters.base import Drafter
from swarmspec.drafters.lookup import Occurrence, PromptLookupDrafter, SuffixDrafter, SuffixIndex
from swarmspec.drafters.model import ModelDrafter
from swarmspec.drafters.sorted import SortedDrafter
from swarmspec.dsi.orchestrator import LocalInstance, TargetInstance, dsi_decode, set_torch_threads
from swarmspec.dsi.ray_workers import RayActor, RayDrafter, RayInstance, start_ray
from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import (
    SORTED,
    LoadedModel,
    check_same_vocabulary,
    check_spec,
    load_model,
    model_name,
    split_spec,
)
from swarmspec.models.registry import REGISTRY
from swarmspec.models.sorted import sorted_exits
from swarmspec.policy import (
    AcceptancePrior,
    BatchPeers,
    CostModelPolicy,
    FixedDepth,
    SpeculationPolicy,
    StepCosts,
    pipelining_pays,
)
from swarmspec.profile import batch_forward_costs, forward_costs, profile_key
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.batch import BatchedTarget
from swarmspec.runners.hf import HFRunner
from swarmspec.runners.sorted import SortedRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import (
    ChainSpeculation,
    ExpansionTree,
    MergedTree,
    NoSpeculation,
    Speculation,
    VotePrior,
    VoteSpeculation,
)
from swarmspec.verify import Verifier, make_verifier

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodeStats


@dataclass
class SequenceState:
    """Everything one generation mutates: the target's cache, the speculation (drafters' caches, vote
    weights) and the policy's running acceptance. The models' weights and the learning meant to be
    shared are not in it."""

    target: ModelRunner
    speculation: Speculation
    policy: SpeculationPolicy

    def run(self, prompt_ids: list[int], verifier: Verifier, **options: Any) -> Iterator[list[int]]:
        """The decode loop (see `decode.decode` for the options)."""
        return decode(self.target, self.speculation, verifier, prompt_ids, policy=self.policy, **options)

    healthy = True  # nothing in it can die

    @property
    def drafters(self) -> Sequence[Drafter]:
        return self.speculation.drafters

    def close(self) -> None:
        """Nothing to release beyond memory."""


@dataclass
class DsiState:
    """What one generation of DSI or the pipeline mutates: the target instances' caches (over one copy
    of the weights) and its drafter."""

    instances: list[TargetInstance]
    drafter: Drafter
    lookahead: int  # dsi: drafts per job; the pipeline: its gamma, or with gamma auto its max_depth
    pipeline: bool
    torch_threads: tuple[int, int]  # PyTorch's intra-op threads on each instance's thread, the drafter's
    policy: SpeculationPolicy | None = None  # the pipeline with gamma auto: what each job verifies

    def run(self, prompt_ids: list[int], verifier: Verifier, **options: Any) -> Iterator[list[int]]:
        """The orchestrator (see `dsi.orchestrator.dsi_decode` for the options)."""
        return dsi_decode(
            self.instances,
            self.drafter,
            verifier,
            prompt_ids,
            lookahead=self.lookahead,
            pipeline=self.pipeline,
            torch_threads=self.torch_threads,
            policy=self.policy,
            **options,
        )

    @property
    def drafters(self) -> Sequence[Drafter]:
        return [self.drafter]

    @property
    def healthy(self) -> bool:
        """False once one of its Ray actors died: the state is then closed, not reused."""
        return not any(isinstance(part, RayActor) and part.dead for part in [*self.instances, self.drafter])

    def close(self) -> None:
        """Stop the Ray actors, if any (a failure to is logged: the actor is then gone already)."""
        for part in [*self.instances, self.drafter]:
            if isinstance(part, RayActor):
                try:
                    part.kill()
                except Exception:
                    logger.warning("could not stop a Ray actor", exc_info=True)


@dataclass
class PipelineChoice:
    """The pipeline with gamma auto: each generation runs pipelined (`pipelined`, drafter and target on
    their shares of the cores) or taking turns (`turns`, the self-tuning chain with every core),
    whichever `pays` says commits more tokens per second now (`policy.pipelining_pays`, from both
    layouts' measured costs and the drafter's running acceptance)."""

    turns: SequenceState
    pipelined: DsiState
    pays: Callable[[], bool]

    def run(self, prompt_ids: list[int], verifier: Verifier, **options: Any) -> Iterator[list[int]]:
        pipelined = self.pays()
        options["stats"].pipelined = pipelined
        return (self.pipelined if pipelined else self.turns).run(prompt_ids, verifier, **options)

    @property
    def drafters(self) -> Sequence[Drafter]:
        return [*self.turns.drafters, *self.pipelined.drafters]

    @property
    def healthy(self) -> bool:
        return self.pipelined.healthy

    def close(self) -> None:
        self.turns.close()
        self.pipelined.close()


GenerationState = SequenceState | DsiState | PipelineChoice


@dataclass
class SharedLearning:
    """What the generations of one engine learn together, bounded in memory: the suffix drafters'
    index of finished sequences, the vote's drafter weights and the policy's acceptance statistics."""

    suffix_index: SuffixIndex = field(default_factory=SuffixIndex)
    vote_prior: VotePrior = field(default_factory=VotePrior)
    acceptance: AcceptancePrior = field(default_factory=AcceptancePrior)


class Engine:
    """Loaded models plus a decoding method chosen at construction, serving any number of generations.

    Each generation runs on a state of its own (`SequenceState`, or `DsiState`), taken from a pool of
    idle ones (or built by `new_state`) and returned when it ends, so interleaved or concurrent
    generations never share a cache; the weights are loaded once.
    """

    def __init__(
        self,
        new_state: Callable[[], GenerationState],
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: frozenset[int],
        batched: BatchedTarget | None = None,
    ) -> None:
        self.new_state = new_state
        self.batched = batched  # continuous batching: the target all generations' forwards share
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self._idle: list[GenerationState] = []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        for spec in [config.target, *config.model_drafters]:  # fail on a bad name before loading weights
            check_spec(spec)
        target = load_model(config.target)
        draft_models = {spec: load_model(spec) for spec in config.model_drafters}
        return cls.from_models(config, target, draft_models)

    @classmethod
    def from_models(
        cls,
        config: EngineConfig,
        target: LoadedModel,
        draft_models: Mapping[str, LoadedModel],
        costs: StepCosts | None = None,
        pipelined_costs: StepCosts | None = None,
        batched: BatchedTarget | None = None,
    ) -> Engine:
        """An engine over models already loaded: several methods can share one copy of the weights.

        With `gamma` auto the policy needs the forward costs: `costs` if given, else this machine's stored
        profile of each model, else measured with the first generation's runners (and stored); the
        pipeline's also `pipelined_costs`, each model's on its share of the cores. With continuous
        batching (`max_batch` above 1) every generation's target runner is a slot of one batched target:
        `batched` if given (shared with other engines over the same target: their sequences then share
        every batched forward), else one of this engine's own."""
        shared = SharedLearning()
        step_costs, pipeline_costs = costs, pipelined_costs
        if config.max_batch == 1:
            batched = None
        elif batched is None:
            batched = target.new_batched_target(
                config.max_batch, config.target_threads or None, config.prefill_chunk
            )
        peers = BatchPeers(lambda: batched.size) if batched else None

        def new_state() -> GenerationState:
            if config.method == "pipeline" and config.gamma == AUTO:
                return new_pipeline_choice()
            if config.method in ORCHESTRATED_METHODS:
                return new_dsi_state(config, target, draft_models, shared)
            return new_sequence_state(config)

        def new_sequence_state(config: EngineConfig) -> SequenceState:
            nonlocal step_costs
            target_runner = warmed_up(
                batched.slot() if batched else target.new_runner(config.target_threads or None)
            )
            speculation = build_speculation(config, target, draft_models, shared)
            if config.gamma != AUTO or config.method == "ar":
                policy: SpeculationPolicy = FixedDepth(
                    0 if config.gamma == AUTO else config.gamma, len(speculation.drafters)
                )
            else:
                if step_costs is None:
                    step_costs = measure_step_costs(config, target_runner, speculation, batched)
                policy = CostModelPolicy(
                    step_costs,
                    config.max_depth,
                    shared.acceptance,
                    peers=peers,
                    cost_shares=[drafter.cost_share for drafter in speculation.drafters],
                )
            return SequenceState(target_runner, speculation, policy)

        def new_pipeline_choice() -> PipelineChoice:
            """The self-tuning pipeline: pipelined, or taking turns as the self-tuning chain."""
            nonlocal pipeline_costs
            turns = new_sequence_state(replace(config, method="chain"))
            pipelined = new_dsi_state(config, target, draft_models, shared)
            if pipeline_costs is None:
                pipeline_costs = measure_pipeline_costs(config, pipelined)
            # Drafting runs on its own core, beside verification: a job is priced at the target's time.
            job_costs = StepCosts(pipeline_costs.verify_ms, (0.0,))
            pipelined.policy = CostModelPolicy(job_costs, config.max_depth, shared.acceptance)
            assert isinstance(turns.policy, CostModelPolicy) and pipeline_costs is not None
            turn_costs, costs_apart = turns.policy.costs, pipeline_costs

            def pays() -> bool:
                rate = shared.acceptance.stats_for(2).overall_rate([0, 1])  # the drafter, either state
                return pipelining_pays(turn_costs, costs_apart, rate, config.max_depth)

            return PipelineChoice(turns, pipelined, pays)

        engine = cls(new_state, target.tokenizer, target.stop_token_ids, batched)
        engine._idle.append(new_state())  # the first request does not pay for paging the weights in
        return engine

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return encode_request(self.tokenizer, request)

    def stream(self, request: GenerationRequest) -> TextStream:
        """Start a generation; iterate the result for text pieces, then read `.result`."""
        stats = DecodeStats()
        token_chunks = self.token_chunks(
            self.prompt_ids(request), request.max_new_tokens, request.sampling, request.seed, stats
        )
        return TextStream(token_chunks, self.tokenizer, request.stop, self.stop_token_ids, stats)

    def token_chunks(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int | None,
        stats: DecodeStats,
    ) -> Iterator[list[int]]:
        """The decode loop on token ids: the tokens committed by each target forward."""
        state = self._acquire()
        # The request's own generator: no global RNG is read or reseeded.
        generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        failed = False
        exits_before = sorted_exit_tally(state.drafters)
        try:
            yield from state.run(
                prompt_ids,
                make_verifier(sampling),
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop_token_ids=self.stop_token_ids,
                generator=generator,
                stats=stats,
            )
        except InvalidRequestError:
            raise  # the request's fault: the state is untouched
        except Exception:
            failed = True  # a failure may have left the state broken (a DSI instance's Ray actor died)
            raise
        finally:  # also when the consumer stops early
            exit_tokens, exit_layers = sorted_exit_tally(state.drafters)
            stats.exit_tokens += exit_tokens - exits_before[0]
            stats.exit_layers += exit_layers - exits_before[1]
            if failed or not state.healthy:
                state.close()
            else:
                self._release(state)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        stream = self.stream(request)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def _acquire(self) -> GenerationState:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.new_state()

    def _release(self, state: GenerationState) -> None:
        with self._lock:
            self._idle.append(state)


def build_speculation(
    config: EngineConfig,
    target: LoadedModel,
    draft_models: Mapping[str, LoadedModel],
    shared: SharedLearning,
) -> Speculation:
    """A new speculation of the method over its drafters (`NoSpeculation` for plain decoding), with
    caches of its own and the engine's shared learning."""
    if config.method == "ar":
        return NoSpeculation()
    drafters = build_drafters(config, target, draft_models, shared, config.drafter_threads)
    if config.method == "chain":
        return ChainSpeculation(drafters[0])
    if config.method == "tree" and config.tree_shape is not None:
        grower = config.drafters.index(config.model_drafters[0])  # the first draft model grows it
        return ExpansionTree(drafters, config.tree_shape, grower)
    if config.method == "tree":
        return MergedTree(drafters)
    return VoteSpeculation(drafters, prior=shared.vote_prior)


# The prompt lookup drafters by name, and the occurrence of the matched n-gram each follows.
PROMPT_LOOKUPS: dict[str, Occurrence] = {"prompt-lookup": "latest", "prompt-lookup-earliest": "earliest"}


def build_drafters(
    config: EngineConfig,
    target: LoadedModel,
    draft_models: Mapping[str, LoadedModel],
    shared: SharedLearning,
    threads: int,
) -> list[Drafter]:
    """The configured drafters, in the order given, with caches of their own (draft models' runners
    with `threads` llama.cpp threads, 0: every core)."""
    drafters: list[Drafter] = []
    for spec in config.drafters:
        if spec in PROMPT_LOOKUPS:
            drafters.append(PromptLookupDrafter(target.vocab_size, occurrence=PROMPT_LOOKUPS[spec]))
        elif spec == "suffix":
            drafters.append(SuffixDrafter(target.vocab_size, shared.suffix_index))
        elif split_spec(spec)[0] == SORTED:
            check_same_vocabulary(target, draft_models[spec])
            model = draft_models[spec].hf_model
            exits = sorted_exits(model, config.sorted_draft.exits)
            exits.restrict_head(model, config.sorted_draft.head_tokens)
            tuned = exits.tuned_thresholds(split_spec(target.spec)[1])
            drafters.append(
                SortedDrafter(SortedRunner(model, exits), config.sorted_draft.thresholds_given(tuned))
            )
        else:
            check_same_vocabulary(target, draft_models[spec])
            drafters.append(ModelDrafter(warmed_up(draft_models[spec].new_runner(threads or None))))
    return drafters


def new_dsi_state(
    config: EngineConfig,
    target: LoadedModel,
    draft_models: Mapping[str, LoadedModel],
    shared: SharedLearning,
) -> DsiState:
    """The target instances and drafter of DSI or the pipeline: runners over the loaded weights on
    threads, or (DSI) Ray actors that load the models in their own processes (a draft model too; a
    model-free drafter stays here)."""
    target_threads, drafter_threads = dsi_threads(config)
    pipeline = config.method == "pipeline"
    lookahead = config.lookahead
    if pipeline:
        lookahead = config.max_depth if config.gamma == AUTO else config.gamma
    if config.workers == "threads":
        instances: list[TargetInstance] = [
            LocalInstance(warmed_up(target.new_runner(target_threads)))
            for _ in range(target_instances(config))
        ]
        (drafter,) = build_drafters(config, target, draft_models, shared, drafter_threads)
        return DsiState(instances, drafter, lookahead, pipeline, (target_threads, drafter_threads))
    start_ray(config.ray_address)
    # On a Ray started here actors reserve no CPU: the threads above already share the cores out, and a
    # second concurrent generation's actors must not wait for the first's. A cluster places them.
    cpus = 1 if config.ray_address else 0
    new_runner = functools.partial(runner_in_actor, shippable(target), target_threads)
    instances = [RayInstance(new_runner, cpus) for _ in range(config.targets)]
    (spec,) = config.drafters
    if spec in config.model_drafters:
        check_same_vocabulary(target, draft_models[spec])
        model = shippable(draft_models[spec])
        drafter: Drafter = RayDrafter(functools.partial(drafter_in_actor, model, drafter_threads), cpus)
    else:
        (drafter,) = build_drafters(config, target, draft_models, shared, drafter_threads)
    # Actors run their own threads; those here only wait for them.
    return DsiState(instances, drafter, lookahead, pipeline, (0, 0))


def shippable(model: LoadedModel) -> LoadedModel | str:
    """What an actor is given to load a model: its spec when it can load it by name (the weights are
    not sent), else the loaded model itself (a PyTorch model built in memory)."""
    return model.spec if is_loadable(model.spec) else model


def runner_in_actor(model: LoadedModel | str, threads: int) -> ModelRunner:
    loaded = load_model(model) if isinstance(model, str) else model
    return warmed_up(loaded.new_runner(threads or None))


def drafter_in_actor(model: LoadedModel | str, threads: int) -> Drafter:
    return ModelDrafter(runner_in_actor(model, threads))


def is_loadable(spec: str) -> bool:
    """A model users load again by name (registered, or a path), not one built in memory."""
    name = model_name(spec)
    return name in REGISTRY or Path(name).expanduser().exists()


def target_instances(config: EngineConfig) -> int:
    """Target instances verifying at once: DSI's; the pipeline's one."""
    return config.targets if config.method == "dsi" else 1


def dsi_threads(config: EngineConfig) -> tuple[int, int]:
    """Threads of each target instance and of a draft model in DSI or the pipeline (llama.cpp's, and
    PyTorch's intra-op threads on their threads): as configured, else the cores shared out between them
    (a model-free drafter needs none)."""
    shared = max(1, (os.cpu_count() or 1) // (target_instances(config) + len(config.model_drafters)))
    return config.target_threads or shared, config.drafter_threads or shared


def measure_step_costs(
    config: EngineConfig, target: ModelRunner, speculation: Speculation, batched: BatchedTarget | None = None
) -> StepCosts:
    """The policy's costs: the target's forward over k rows (and, batched, of b sequences of k rows) and
    each draft model's per-token forward (model-free drafters: 0), from this machine's stored profiles
    or measured now and stored."""
    key = profile_key(config.target, config.target_threads)
    verify_ms = forward_costs(key, target, persist=is_loadable(config.target))
    batch_verify_ms = (
        batch_forward_costs(key, batched, config.max_batch, persist=is_loadable(config.target))
        if batched
        else {}
    )
    draft_token_ms = []
    for spec, drafter in zip(config.drafters, speculation.drafters, strict=True):
        runner = costed_runner(drafter)
        if runner is None:
            draft_token_ms.append(0.0)
            continue
        key = profile_key(spec, config.drafter_threads)
        draft_token_ms.append(forward_costs(key, runner, ks=(1,), persist=is_loadable(spec))[1])
    return StepCosts(verify_ms, tuple(draft_token_ms), batch_verify_ms)


def measure_pipeline_costs(config: EngineConfig, state: DsiState) -> StepCosts:
    """The pipeline's costs: the target's forward over k rows and the drafter's per token, each on its
    own share of the cores (stored profiles, or measured now on a thread with that many PyTorch
    threads, as the pipeline runs them)."""
    (instance,) = state.instances
    assert isinstance(instance, LocalInstance)  # the pipeline runs on threads
    (spec,) = config.drafters
    drafter = costed_runner(state.drafter)
    assert drafter is not None  # the pipeline runs a draft model
    target_threads, drafter_threads = state.torch_threads
    verify_ms = on_threads(
        target_threads,
        forward_costs,
        profile_key(config.target, target_threads),
        instance.runner,
        persist=is_loadable(config.target),
    )
    draft_ms = on_threads(
        drafter_threads,
        forward_costs,
        profile_key(spec, drafter_threads),
        drafter,
        ks=(1,),
        persist=is_loadable(spec),
    )
    return StepCosts(verify_ms, (draft_ms[1],))


def on_threads(threads: int, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function` called on a thread of its own with `threads` PyTorch intra-op threads (0: as they are),
    as the pipeline's workers run."""
    with ThreadPoolExecutor(1, thread_name_prefix="swarmspec-profile") as pool:  # one thread for both
        pool.submit(set_torch_threads, threads).result()
        return pool.submit(function, *args, **kwargs).result()


def sorted_exit_tally(drafters: Sequence[Drafter]) -> tuple[int, int]:
    """Tokens the sorted drafts among `drafters` drafted so far, and the layers those ran."""
    tallies = [d.exit_tally for d in drafters if isinstance(d, SortedDrafter)]
    return sum(t[0] for t in tallies), sum(t[1] for t in tallies)


def costed_runner(drafter: Drafter) -> ModelRunner | None:
    """What a drafter pays per drafted token: a draft model's forward; a sorted draft's whole model (its
    deepest exit, an upper bound); nothing for a model-free drafter."""
    if isinstance(drafter, ModelDrafter):
        return drafter.runner
    if isinstance(drafter, SortedDrafter):
        return HFRunner(drafter.runner.model)
    return None


def encode_request(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    """The request's prompt ids: its messages or its prompt (see `encode_chat`, `encode_prompt`)."""
    if request.messages:
        return encode_chat(tokenizer, request.messages)
    return encode_prompt(tokenizer, request.prompt, request.chat)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`, as a single user turn in the chat template when `chat` and there is one."""
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [ChatMessage("user", prompt)])
    return tokenizer(prompt).input_ids


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of a conversation in the chat template, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise InvalidRequestError("this model has no chat template: send a plain prompt")
    turns = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:  # the template refuses the conversation, e.g. roles out of order
        raise InvalidRequestError(f"the chat template refused these messages: {err}") from err
    return tokenizer(text, add_special_tokens=False).input_ids


def warmed_up(runner: ModelRunner) -> ModelRunner:
    """Run one token through the model so that the first request does not pay for loading.

    Checkpoints are memory-mapped: the first forward pages every weight in from disk (tens of seconds
    for the 1.5B target on a cold page cache), which would otherwise be reported as prefill time.
    """
    runner.forward(torch.zeros(1, dtype=torch.int64), num_logits=1)
    runner.reset()
    return runner


class TextStream:
    """Detokenizes committed tokens incrementally and applies stop strings.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop
    string, so streamed pieces concatenate to exactly the final text.
    """

    def __init__(
        self,
        token_chunks: Iterator[list[int]],
        tokenizer: PreTrainedTokenizerBase,
        stop: tuple[str, ...],
        stop_token_ids: frozenset[int],
        stats: DecodeStats,
    ) -> None:
        self._chunks = token_chunks
        self._tokenizer = tokenizer
        self._stop = stop
        self._stop_token_ids = stop_token_ids
        self.stats = stats
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        token_ids: list[int] = []
        emitted = 0
        finish_reason = "length"
        text = ""
        for chunk in self._chunks:
            token_ids.extend(chunk)
            text = self._tokenizer.decode(token_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish_reason = text[:cut], "stop"
                self._chunks.close()  # stops the decode loop: no more target forwards
                token_ids = token_ids[: self._tokens_covering(token_ids, cut)]
                self.stats.truncate(len(token_ids))  # tokens and counters agree with the text
                break
            if chunk[-1] in self._stop_token_ids:
                finish_reason = "stop"
            safe = len(text) - self._held_back(text)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if len(text) > emitted:
            yield text[emitted:]
        self.result = GenerationResult(text, token_ids, finish_reason, self.stats)

    def _tokens_covering(self, token_ids: list[int], length: int) -> int:
        """The fewest leading tokens whose text reaches `length` characters (the text before a stop
        string; the token in which the stop string starts is kept if it also carries returned text)."""
        for n in range(len(token_ids) + 1):
            if len(self._tokenizer.decode(token_ids[:n], skip_special_tokens=True)) >= length:
                return n
        return len(token_ids)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still change or turn into a stop string: a multi-byte
        character split across tokens, and before it what could be the start of a stop string."""
        stem = text.rstrip("\ufffd")
        return (
            len(text)
            - len(stem)
            + max(
                (n for s in self._stop for n in range(len(s) - 1, 0, -1) if stem.endswith(s[:n])),
                default=0,
            )
        )
