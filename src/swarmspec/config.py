"""Typed configuration. The CLI (and later the server) builds these by field name, one flag per field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from swarmspec.errors import InvalidRequestError
from swarmspec.models.registry import DEFAULT_DRAFTER, DEFAULT_TARGET, split_exit
from swarmspec.sampling import SamplingConfig
from swarmspec.tree import FixedWidths, NodeBudget, TreeShape

METHODS = ("ar", "chain", "tree", "vote", "dsi", "pipeline")
# Methods that take one drafter, and those whose target verifies on threads of its own, in
# `dsi.orchestrator` (not a step at a time in the engine's loop).
ONE_DRAFTER_METHODS = ("chain", "dsi", "pipeline")
ORCHESTRATED_METHODS = ("dsi", "pipeline")
# Drafters that need no model: n-gram lookup in the prompt and output, suffix match over earlier outputs.
MODEL_FREE_DRAFTERS = ("prompt-lookup", "prompt-lookup-earliest", "suffix")
# What users of `transformers` pick instead: plain generate, assisted generation, prompt lookup.
HF_BASELINES = ("hf-generate", "hf-assisted", "hf-prompt-lookup")
# What users of llama.cpp pick instead (llama-cpp-python, same GGUF and threads): plain decoding and
# its prompt lookup. Only for a llama.cpp target.
LLAMA_CPP_BASELINES = ("llama-cpp", "llama-cpp-prompt-lookup")
BASELINES = (*HF_BASELINES, *LLAMA_CPP_BASELINES)
# Model specs with this prefix run on llama.cpp (see models.loading.VARIANTS).
LLAMA_CPP_PREFIX = "llamacpp:"
# A drafter spec with this prefix drafts with the model's early exits (a sorted draft, see SortedDraft).
SORTED_PREFIX = "sorted:"
AUTO = "auto"
# Where DSI's target and drafter instances run.
WORKERS = ("threads", "ray")
Gamma = int | Literal["auto"]


def comma_list(text: str) -> tuple[str, ...]:
    """ "a, b,,c" -> ("a", "b", "c"): the CLI's (and bench variants') list syntax."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def read_gamma(text: str) -> Gamma:
    """A gamma as written: a number of tokens or "auto" (ValueError otherwise)."""
    return AUTO if text.strip() == AUTO else int(text)


def check_gamma(gamma: Gamma, max_depth: int, allow_zero: bool = False) -> None:
    lowest = 0 if allow_zero else 1
    if gamma != AUTO and (not isinstance(gamma, int) or gamma < lowest):
        raise InvalidRequestError(f"gamma must be >= {lowest} or {AUTO!r}, got {gamma!r}")
    if max_depth < 1:
        raise InvalidRequestError(f"max_depth must be >= 1, got {max_depth}")


@dataclass(frozen=True)
class SortedDraft:
    """How a `sorted:` drafter drafts (S2D): its exits, as layer counts (the model's first layers, then its
    norm and LM head), and per exit but the deepest the top probability at which a token stops there."""

    exits: tuple[int, ...] = (6, 12, 18, 24)
    # Empty: the thresholds `swarmspec train-sorted` tuned for the target, else 0.5 at each exit but the
    # deepest (which always answers).
    thresholds: tuple[float, ...] = ()
    # Draft over the N tokens the targets said most often in training only (a cheaper LM head; needs
    # trained exits); 0: the full head.
    head_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.exits or list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1:
            raise InvalidRequestError(f"sorted exits must be increasing layer counts, got {list(self.exits)}")
        if self.head_tokens < 0:
            raise InvalidRequestError(
                f"--head-tokens must be >= 0 (0: the full head), got {self.head_tokens}"
            )
        if self.thresholds and (
            len(self.thresholds) != len(self.exits) - 1 or any(not 0 <= t <= 1 for t in self.thresholds)
        ):
            raise InvalidRequestError(
                f"give one exit threshold in [0, 1] per exit but the deepest ({len(self.exits) - 1} for "
                f"exits {list(self.exits)}), got {list(self.thresholds)}"
            )

    def thresholds_given(self, tuned: tuple[float, ...] | None) -> tuple[float, ...]:
        """The thresholds to draft with: as configured, else `tuned` (for the target), else 0.5 each."""
        return self.thresholds or tuned or (0.5,) * (len(self.exits) - 1)


# The server's cache tokens (prompt + max_tokens) of all running generations together: 65,536 tokens of
# the 1.5B's fp32 keys and values are 3.7 GB (twice that while rejected drafts await compaction).
DEFAULT_KV_BUDGET = 65_536


@dataclass(frozen=True)
class EngineConfig:
    # Registered name, local checkpoint dir, .gguf file or hub id of the model whose output we promise;
    # prefixed "llamacpp:" (a registered name or .gguf file) it runs on llama.cpp, "cuda:" on the GPU.
    target: str = LLAMA_CPP_PREFIX + DEFAULT_TARGET
    # "ar": plain autoregressive decoding (the baseline); "chain": one drafter proposes gamma tokens;
    # "tree": every drafter's proposal merged into one token tree (or a tree grown from the first model
    # drafter, see tree_widths and tree_budget); "vote": a weighted vote of the drafters picks one
    # chain (Minions); "dsi": several target instances verify one drafter's drafts at once (DSI, see
    # targets and lookahead); "pipeline": one draft model drafts on a thread of its own while the target
    # verifies what it drafted before, gamma tokens a forward (Minions' pipeline; auto: per generation
    # pipelined or taking turns as chain, whichever the measured costs say pays, and each job's drafts).
    method: str = "chain"
    # Model specs (optionally prefixed "int8:" / "onednn:" / "cuda:" / "llamacpp:", or "sorted:" for a
    # sorted draft of a PyTorch model) or model-free drafters (MODEL_FREE_DRAFTERS). Empty: the method's
    # default, see `default_drafters`.
    drafters: tuple[str, ...] = ()
    # How "sorted:" drafters draft.
    sorted_draft: SortedDraft = field(default_factory=SortedDraft)
    # Tokens drafted per target forward, the depth of the speculated chain or tree: a number, or "auto":
    # every step the depth and the verified nodes that maximize expected committed tokens per second,
    # from the measured costs and the running acceptance (see policy.CostModelPolicy).
    gamma: Gamma = AUTO
    # gamma auto only: the deepest draft; model-free drafters propose this far when their match allows.
    max_depth: int = 16
    # tree only: children per node at each depth (e.g. 3,2,1,1) expanded from the first model drafter,
    # the other drafters' chains merged in; empty: every drafter's chain merged into one trie.
    tree_widths: tuple[int, ...] = ()
    # tree only: a dynamic tree of at most this many drafted nodes from the first model drafter, the
    # most confident first (see tree.NodeBudget), the other drafters merged in; 0: off.
    tree_budget: int = 0
    # llama.cpp threads of the target's runner (dsi: of each instance) and of each draft model's runner;
    # 0: every core (dsi: the cores shared out between the instances and a draft model).
    target_threads: int = 0
    drafter_threads: int = 0
    # dsi only: target instances verifying at once (one copy of the weights, a cache each), and the
    # most drafted tokens one verification job takes (the pipeline's is gamma).
    targets: int = 2
    lookahead: int = 3
    # dsi only: where the instances run: "threads" in this process (one copy of the weights), or "ray"
    # actors (a process each, on this machine or the cluster at ray_address).
    workers: str = "threads"
    ray_address: str | None = None
    # Continuous batching (not dsi or pipeline): up to this many concurrent generations
    # verify their drafts in one target forward, a step at a time (see runners.batch); 1: each alone.
    max_batch: int = 1
    # Continuous batching on PyTorch: a joining prompt is prefilled this many tokens per step, the
    # running sequences decoding between the parts (None: runners.batch.PREFILL_CHUNK). llama.cpp
    # prefills in the 512-token calls plain decoding makes, which exactness fixes.
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_gamma(self.gamma, self.max_depth)
        if self.target_threads < 0 or self.drafter_threads < 0:
            raise InvalidRequestError("thread counts must be >= 1 (0: every core)")
        if self.workers not in WORKERS:
            raise InvalidRequestError(f"unknown workers {self.workers!r}; choose one of {', '.join(WORKERS)}")
        if self.targets < 1 or self.lookahead < 1:
            raise InvalidRequestError(
                f"--targets and --lookahead must be >= 1, got {self.targets}, {self.lookahead}"
            )
        if self.max_batch < 1:
            raise InvalidRequestError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk is not None and (
            self.prefill_chunk < 1 or self.target.startswith(LLAMA_CPP_PREFIX)
        ):
            raise InvalidRequestError(
                f"--prefill-chunk takes a token count >= 1 on a PyTorch target, not {self.prefill_chunk} on "
                f"{self.target} (llama.cpp prefills in the 512-token calls plain decoding makes)"
            )
        if self.max_batch > 1 and self.method in ORCHESTRATED_METHODS:
            raise InvalidRequestError(
                f"continuous batching (--max-batch > 1) runs ar, chain, tree or vote, not {self.method}"
            )
        if not self.drafters:
            object.__setattr__(self, "drafters", default_drafters(self.method, self.target))
        if self.workers == "ray" and any(d.startswith(SORTED_PREFIX) for d in self.drafters):
            raise InvalidRequestError("sorted drafts run with --workers threads, not ray")
        if self.method in ONE_DRAFTER_METHODS and len(self.drafters) != 1:
            raise InvalidRequestError(
                f"{self.method} takes one drafter, got {len(self.drafters)}; "
                "use --method tree or vote for several"
            )
        if self.method == "pipeline" and not self.model_drafters:
            raise InvalidRequestError(
                "--method pipeline overlaps a draft model's drafting with verification; model-free "
                f"drafters ({', '.join(MODEL_FREE_DRAFTERS)}) draft in microseconds: use --method chain"
            )
        if self.method == "pipeline" and self.workers != "threads":
            raise InvalidRequestError("--method pipeline runs on threads; --workers ray is for dsi")
        if self.tree_widths or self.tree_budget:
            if self.method != "tree":
                raise InvalidRequestError(f"--tree and --tree-budget need --method tree, not {self.method}")
            if self.tree_widths and self.tree_budget:
                raise InvalidRequestError("give either --tree widths or --tree-budget, not both")
            if self.tree_widths and min(self.tree_widths) < 1:
                raise InvalidRequestError(f"tree widths must be >= 1, got {list(self.tree_widths)}")
            if self.tree_budget < 0:
                raise InvalidRequestError(f"--tree-budget must be >= 1 (0: off), got {self.tree_budget}")
            if not self.model_drafters:
                raise InvalidRequestError("--tree and --tree-budget grow the tree from a model drafter")

    @property
    def tree_shape(self) -> TreeShape | None:
        """The shape of the tree grown from the first model drafter; None: drafters' chains merged."""
        if self.tree_widths:
            return FixedWidths(self.tree_widths)
        if self.tree_budget:
            return NodeBudget(self.tree_budget)
        return None

    @property
    def model_drafters(self) -> tuple[str, ...]:
        """The drafters that are models (to resolve and load), without repeats."""
        if self.method == "ar":
            return ()
        return tuple(dict.fromkeys(d for d in self.drafters if d not in MODEL_FREE_DRAFTERS))


def default_baselines(target: str) -> tuple[str, ...]:
    """A llama.cpp target's peers are llama.cpp's own plus plain transformers; else transformers'."""
    if target.startswith(LLAMA_CPP_PREFIX):
        return (*LLAMA_CPP_BASELINES, "hf-generate")
    return HF_BASELINES


def default_drafters(method: str, target: str = "") -> tuple[str, ...]:
    """chain, dsi and pipeline: the packaged 0.5B model (on the target's backend); tree and vote: the
    model, prompt lookup and suffix matching."""
    model = LLAMA_CPP_PREFIX + DEFAULT_DRAFTER if target.startswith(LLAMA_CPP_PREFIX) else DEFAULT_DRAFTER
    if method == "ar":
        return ()
    if method in ONE_DRAFTER_METHODS:
        return (model,)
    return (model, "prompt-lookup", "suffix")


def method_drafters(method: str, drafters: tuple[str, ...]) -> tuple[str, ...]:
    """The drafters `method` takes of those given for several methods: one-drafter methods the first
    (the pipeline the first draft model), plain decoding none, the others all."""
    if method == "ar":
        return ()
    if method == "pipeline":
        models = [d for d in drafters if d not in MODEL_FREE_DRAFTERS]
        return tuple(models[:1]) or drafters[:1]
    return drafters[:1] if method in ONE_DRAFTER_METHODS else drafters


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str  # "system", "user" or "assistant"
    content: str


CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationRequest:
    # The text to continue (with `chat`, a single user turn); empty when `messages` are given.
    prompt: str = ""
    # Upper bound on generated tokens; generation also stops at EOS or a stop string.
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Seeds the request's own torch.Generator; None draws a fresh seed.
    seed: int | None = None
    # Wrap the prompt in the target's chat template (as a single user turn).
    chat: bool = True
    # Generation stops when the text contains any of these; the stop string is not returned.
    stop: tuple[str, ...] = ()
    # A conversation to answer, rendered with the target's chat template (instead of `prompt`).
    messages: tuple[ChatMessage, ...] = ()

    def __post_init__(self) -> None:
        if self.messages:
            if self.prompt:
                raise InvalidRequestError("give either a prompt or messages, not both")
            if not self.chat:
                raise InvalidRequestError("messages need the chat template (chat=True)")
            bad_roles = sorted({m.role for m in self.messages} - set(CHAT_ROLES))
            if bad_roles:
                raise InvalidRequestError(
                    f"unknown message roles {', '.join(bad_roles)}; use {', '.join(CHAT_ROLES)}"
                )
            if not any(m.content.strip() for m in self.messages):
                raise InvalidRequestError("the messages are empty")
        elif not self.prompt.strip():
            raise InvalidRequestError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")


@dataclass(frozen=True)
class LoadBenchConfig:
    """`swarmspec bench-serve`: concurrent streaming clients against the server, per speculation length."""

    # The 0.5B on PyTorch (oneDNN), where batched forwards are cheap, keeps the sweep to about 20
    # minutes on 2 cores; llama.cpp targets batch every method, each server holding a context of
    # (largest concurrency) x 4,096 cells.
    target: str = "onednn:" + DEFAULT_DRAFTER
    method: str = "chain"
    drafters: tuple[str, ...] = ("prompt-lookup",)
    # Concurrent clients, one level after another; the server batches up to the largest.
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # Speculation lengths, one server each: fixed gammas (0: plain decoding) and auto (batch-aware).
    gammas: tuple[Gamma, ...] = (0, 2, 4, 8, AUTO)
    max_depth: int = 16
    # Requests per level: requests_per_client per client, at least min_requests.
    requests_per_client: int = 2
    min_requests: int = 8
    max_tokens: int = 64
    # Passes over all levels (the servers interleaved in each); throughput is the median over them.
    rounds: int = 1
    # Spec-Bench-format JSONL (first turns, every family in turn); None: the built-in prompt set.
    questions: str | None = None
    out_dir: str = "bench-serve"

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise InvalidRequestError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        if not self.gammas:
            raise InvalidRequestError("give at least one speculation length")
        for gamma in self.gammas:
            check_gamma(gamma, self.max_depth, allow_zero=True)
        for name in ("requests_per_client", "min_requests", "max_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class BenchConfig:
    # Spec-Bench-format JSONL; None runs the built-in prompt set.
    questions: str | None = None
    # Task families (e.g. mt-bench, rag) or raw categories to keep; empty keeps all.
    categories: tuple[str, ...] = ()
    # First N questions of each task family; None keeps all.
    per_category: int | None = None
    max_new_tokens: int = 128
    methods: tuple[str, ...] = METHODS
    # None: the target backend's peers, see `default_baselines`.
    baselines: tuple[str, ...] | None = None
    target: str = LLAMA_CPP_PREFIX + DEFAULT_TARGET
    # Drafters of every speculative method; empty: each method's default (`default_drafters`).
    drafters: tuple[str, ...] = ()
    sorted_draft: SortedDraft = field(default_factory=SortedDraft)
    gamma: Gamma = AUTO
    max_depth: int = 16
    # The tree method's widths or node budget (see EngineConfig.tree_widths and tree_budget).
    tree_widths: tuple[int, ...] = ()
    tree_budget: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # llama.cpp threads of the target (and the llama.cpp baselines) and of each draft model; 0: every core.
    target_threads: int = 0
    drafter_threads: int = 0
    # dsi: target instances, lookahead and where they run (see EngineConfig).
    targets: int = 2
    lookahead: int = 3
    workers: str = "threads"
    ray_address: str | None = None
    # Question i, repeat r is generated with seed + i (the same for every contender and repeat).
    seed: int = 0
    # Timed runs per question and contender; figures are medians over them.
    repeats: int = 1
    # Report directory; None means bench-results/<UTC timestamp>.
    out: str | None = None
    # More swarmspec contenders, each a method with settings of its own: "NAME:method=M,key=value,...",
    # e.g. "chain-g6:method=chain,gamma=6" (see `parse_variant` for the keys).
    variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.baselines is None:
            object.__setattr__(self, "baselines", default_baselines(self.target))
        assert self.baselines is not None
        if not self.target.startswith(LLAMA_CPP_PREFIX) and set(self.baselines) & set(LLAMA_CPP_BASELINES):
            raise InvalidRequestError(
                f"{', '.join(LLAMA_CPP_BASELINES)} run the target's GGUF: give a llama.cpp target "
                f"(--target {LLAMA_CPP_PREFIX}{self.target})"
            )
        unknown = [m for m in self.methods if m not in METHODS] + [
            b for b in self.baselines if b not in BASELINES
        ]
        if unknown:
            raise InvalidRequestError(
                f"unknown methods or baselines: {', '.join(unknown)}; methods: {', '.join(METHODS)}; "
                f"baselines: {', '.join(BASELINES)}"
            )
        if not self.methods and not self.baselines and not self.variants:
            raise InvalidRequestError("nothing to benchmark: no methods and no baselines")
        check_gamma(self.gamma, self.max_depth)
        for name in ("max_new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.tree_widths or self.tree_budget) and "tree" not in self.methods:
            raise InvalidRequestError(
                "--tree and --tree-budget shape the tree method: add it to --methods (a tree variant "
                "takes tree= or tree-budget=)"
            )
        names = [*(name for name, _ in self.contender_configs()), *self.baselines]  # builds: validates
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidRequestError(
                f"contender names must differ; given more than once: {', '.join(repeated)}"
            )

    def contender_configs(self) -> list[tuple[str, EngineConfig]]:
        """The swarmspec contenders by name: each method (named after it), then each variant."""
        return [(method, self.engine_config(method)) for method in self.methods] + [
            parse_variant(variant, self) for variant in self.variants
        ]

    def engine_config(self, method: str) -> EngineConfig:
        """One method's engine: the given drafters (chain takes the first, ar none), else the method's
        default."""
        return EngineConfig(**self.engine_fields(method))

    def engine_fields(self, method: str) -> dict[str, Any]:
        """`engine_config`'s fields, by name."""
        is_tree = method == "tree"
        return {
            "target": self.target,
            "method": method,
            "drafters": method_drafters(method, self.drafters),
            "sorted_draft": self.sorted_draft,
            "gamma": self.gamma,
            "max_depth": self.max_depth,
            "tree_widths": self.tree_widths if is_tree else (),
            "tree_budget": self.tree_budget if is_tree else 0,
            "target_threads": self.target_threads,
            "drafter_threads": self.drafter_threads,
            "targets": self.targets,
            "lookahead": self.lookahead,
            "workers": self.workers,
            "ray_address": self.ray_address,
        }

    @property
    def hf_target(self) -> str | None:
        """The PyTorch model the transformers baselines run when the target runs on llama.cpp."""
        if self.target.startswith(LLAMA_CPP_PREFIX) and set(self.baselines or ()) & set(HF_BASELINES):
            return self.target.removeprefix(LLAMA_CPP_PREFIX)
        return None

    @property
    def assistant(self) -> str:
        """hf-assisted's assistant model: the first model among the drafters, else the default drafter."""
        first = next((d for d in self.drafters if d not in MODEL_FREE_DRAFTERS), DEFAULT_DRAFTER)
        # transformers runs it: the whole model, for a sorted draft or one of its exits
        return split_exit(first.removeprefix(LLAMA_CPP_PREFIX).removeprefix(SORTED_PREFIX))[1]

    @property
    def model_drafters(self) -> tuple[str, ...]:
        """Every drafter model some method or baseline needs, each once."""
        specs = [s for _, config in self.contender_configs() for s in config.model_drafters]
        if "hf-assisted" in self.baselines:
            specs.append(self.assistant)
        return tuple(dict.fromkeys(specs))


@dataclass(frozen=True)
class TrainSortedConfig:
    """`swarmspec train-sorted`: train a sorted draft's exits on targets' greedy answers (train.sorted)."""

    # The draft model (a PyTorch model spec without prefix) whose exits are trained.
    drafter: str = DEFAULT_DRAFTER
    # Whose answers the exits learn to predict: one or several targets of the drafter's model family
    # (any backend; llama.cpp answers fastest here), the drafter itself for self-speculation.
    targets: tuple[str, ...] = (LLAMA_CPP_PREFIX + DEFAULT_TARGET,)
    # Spec-Bench-format JSONL of prompts (never the benchmark questions you report on); None: built-in.
    prompts: str | None = None
    exits: tuple[int, ...] = SortedDraft().exits
    # The rank of each exit's adapter (0: its norm only).
    rank: int = 64
    # Tokens of each target's answer to each prompt.
    max_new_tokens: int = 128
    epochs: int = 4
    batch_rows: int = 256
    learning_rate: float = 1e-3
    # Share of the prompts held out to measure each exit's acceptance before and after.
    held_out: float = 0.2
    seed: int = 0
    # Tune each target's exit thresholds on the held-out prompts (sorted: drafters then use them).
    tune_thresholds: bool = True
    # Also report acceptance with a draft head of the N most frequent answer tokens (0: not).
    head_tokens: int = 8192
    # Start over instead of resuming an interrupted run with the same settings.
    restart: bool = False

    def __post_init__(self) -> None:
        SortedDraft(self.exits)  # validates the exits
        if self.drafter.partition(":")[0] in ("llamacpp", "int8", "onednn", "sorted", "cuda"):
            raise InvalidRequestError(f"train a PyTorch model's exits: give its name, not {self.drafter!r}")
        if not self.targets:
            raise InvalidRequestError("give at least one --target whose answers to learn")
        if min(self.rank + 1, self.head_tokens + 1, self.max_new_tokens, self.epochs, self.batch_rows) < 1:
            raise InvalidRequestError(
                "rank and head tokens must be >= 0 and tokens, epochs and batch rows >= 1"
            )
        if not self.learning_rate > 0 or not 0 < self.held_out < 1:
            raise InvalidRequestError("the learning rate must be > 0 and the held-out share in (0, 1)")


@dataclass(frozen=True)
class SimulationConfig:
    """`swarmspec simulate`: DSI, SI and plain decoding on the DSI paper's model (see dsi.simulator)."""

    # The grid: drafter cost c (target forwards per drafted token) x acceptance rate a.
    drafter_costs: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    acceptances: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    # DSI's target instances in the grid; a trace predicts for 1..targets.
    targets: int = 4
    # Each contender runs at its best lookahead among these.
    lookaheads: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)
    # DSI's drafter instances, and whether a cancelled forward stops at once (the paper's model) or runs
    # to its end (swarmspec's orchestrator: a llama.cpp or PyTorch call cannot be stopped midway).
    drafters: int = 1
    preemptible: bool = True
    # Tokens each simulated run generates (figures are its mean latency per token).
    tokens: int = 2000
    seed: int = 0
    # Trace-driven mode: this machine's stored cost profiles of a target and a drafter (a model spec, or
    # model-free drafters: free), with threads as they were profiled (0: every core).
    target: str | None = None
    drafter: str | None = None
    target_threads: int = 0
    drafter_threads: int = 0
    # The drafter's i.i.d. acceptance rate, or a bench report (bench.json) to estimate it from.
    acceptance: float | None = None
    report: str | None = None
    contender: str = "chain"
    # Report directory; None means simulate-results/<UTC timestamp>.
    out: str | None = None

    def __post_init__(self) -> None:
        if not self.lookaheads or min(self.targets, self.drafters, self.tokens, *self.lookaheads) < 1:
            raise InvalidRequestError("targets, drafters, tokens and lookaheads must be >= 1")
        if any(c < 0 for c in self.drafter_costs) or not self.drafter_costs:
            raise InvalidRequestError("drafter costs must be >= 0")
        rates = [*self.acceptances, *([self.acceptance] if self.acceptance is not None else [])]
        if not rates or any(not 0 <= a <= 1 for a in rates):
            raise InvalidRequestError("acceptance rates must be in [0, 1]")
        if self.trace:
            if not self.target or not self.drafter:
                raise InvalidRequestError("a trace needs both --target and --drafter")
            if (self.acceptance is None) == (self.report is None):
                raise InvalidRequestError("a trace needs one of --acceptance A or --report bench.json")

    @property
    def trace(self) -> bool:
        """Trace-driven: predict for this machine's measured costs instead of the grid."""
        return bool(self.target or self.drafter or self.report or self.acceptance is not None)


# A variant's keys: the `EngineConfig` field each sets, and how its value reads.
VARIANT_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "method": ("method", str.strip),
    "drafters": ("drafters", comma_list),
    "gamma": ("gamma", read_gamma),
    "max-depth": ("max_depth", int),
    "tree": ("tree_widths", lambda text: tuple(int(w) for w in comma_list(text))),  # empty: merged chains
    "tree-budget": ("tree_budget", int),
    "targets": ("targets", int),
    "lookahead": ("lookahead", int),
    "workers": ("workers", str.strip),
}


def parse_variant(spec: str, bench: BenchConfig) -> tuple[str, EngineConfig]:
    """A bench variant "NAME:method=M,key=value,...": method M's engine as the bench configures it
    (`BenchConfig.engine_fields`), with the given keys (VARIANT_KEYS: the CLI's flag names, `drafters`
    for `--drafter`) changed. A list value goes on after commas (drafters=prompt-lookup,suffix and
    tree=3,2,1,1): a part without "=" belongs to the key before it. Setting one tree shape (`tree` or
    `tree-budget`) clears the other. NAME may not be a method's or a baseline's name: those name the
    contenders speedups are measured against."""
    usage = f"a variant is NAME:method=M,key=value,... with keys {', '.join(VARIANT_KEYS)}; got {spec!r}"
    name, _, settings = spec.partition(":")
    name = name.strip()
    if not name or not settings:
        raise InvalidRequestError(usage)
    if name in METHODS or name in BASELINES:
        raise InvalidRequestError(f"variant {name}: a method's or a baseline's name; give it another name")
    values: dict[str, str] = {}
    key = None
    for part in settings.split(","):
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in VARIANT_KEYS or key in values:
                raise InvalidRequestError(f"variant {name}: unknown or repeated key {key!r}; {usage}")
            values[key] = value
        elif key is None:
            raise InvalidRequestError(usage)
        else:
            values[key] += "," + part
    if "method" not in values:
        raise InvalidRequestError(f"variant {name}: no method; {usage}")
    method = values["method"].strip()
    if method not in METHODS:
        raise InvalidRequestError(
            f"variant {name}: unknown method {method!r}; choose one of {', '.join(METHODS)}"
        )
    fields = bench.engine_fields(method)
    for key, text in values.items():
        field_name, read = VARIANT_KEYS[key]
        try:
            fields[field_name] = read(text)
        except ValueError:
            raise InvalidRequestError(f"variant {name}: {key}={text!r} is not a valid value") from None
    if "tree" in values and "tree-budget" not in values:
        fields["tree_budget"] = 0
    if "tree-budget" in values and "tree" not in values:
        fields["tree_widths"] = ()
    try:
        return name, EngineConfig(**fields)
    except InvalidRequestError as err:
        raise InvalidRequestError(f"variant {name}: {err}") from None
