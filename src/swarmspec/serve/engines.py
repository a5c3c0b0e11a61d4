"""The server's engines: the models loaded once, an engine per target and speculation method built on
first use."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace

from swarmspec.config import EngineConfig, GenerationRequest, default_drafters, method_drafters
from swarmspec.decode import check_fits
from swarmspec.engine import Engine, encode_request
from swarmspec.models.loading import LoadedModel, check_spec, load_model
from swarmspec.runners.batch import BatchedTarget


class DraftModels:
    """Draft models by spec, each loaded the first time an engine needs it: one copy of its weights
    however many targets and methods draft with it (a sorted draft serves every target this way)."""

    def __init__(self, loaded: Mapping[str, LoadedModel] | None = None) -> None:
        self.loaded = dict(loaded or {})
        self._lock = threading.Lock()

    def __getitem__(self, spec: str) -> LoadedModel:
        with self._lock:
            if spec not in self.loaded:
                check_spec(spec)
                self.loaded[spec] = load_model(spec)
            return self.loaded[spec]


class MethodEngines:
    """Engines over one target, one per method (a request may choose its method). The configured
    drafters serve every method (chain takes the first); without drafters each method gets its default.
    Models are loaded once, when the first engine needing them is built; draft models may be shared
    with other targets' engines (`DraftModels`). With continuous batching the engines share one batched
    target: a batch mixes methods."""

    def __init__(
        self,
        config: EngineConfig,
        target: LoadedModel | None = None,
        draft_models: DraftModels | Mapping[str, LoadedModel] | None = None,
    ) -> None:
        self.config = config
        # Drafters the user chose serve every method; the method's defaults only the configured method.
        default = default_drafters(config.method, config.target)
        self.given_drafters = () if config.method == "ar" or config.drafters == default else config.drafters
        self.target = target or load_model(config.target)
        self.draft_models = (
            draft_models if isinstance(draft_models, DraftModels) else DraftModels(draft_models)
        )
        self.engines: dict[str, Engine] = {}
        # Continuous batching: one batched target for every method, so that requests of different
        # methods share each batched forward (and the batch-aware policy sees the whole batch).
        self.batched: BatchedTarget | None = None
        self._lock = threading.Lock()

    def config_for(self, method: str) -> EngineConfig:
        """The configured engine with another method (tree shapes only for the tree)."""
        drafters = method_drafters(method, self.given_drafters)
        if method == self.config.method:
            return self.config
        tree = method == "tree"
        return replace(
            self.config,
            method=method,
            drafters=drafters,
            tree_widths=self.config.tree_widths if tree else (),
            tree_budget=self.config.tree_budget if tree else 0,
        )

    def check(self, request: GenerationRequest) -> int:
        """Refuse, before it waits in the queue, a request that does not fit the target's context; else
        its prompt's length in tokens."""
        prompt_ids = encode_request(self.target.tokenizer, request)
        check_fits(len(prompt_ids), request.max_new_tokens, self.target.max_length)
        return len(prompt_ids)

    def __call__(self, method: str) -> Engine:
        with self._lock:
            if method not in self.engines:
                config = self.config_for(method)  # validates
                drafts = {spec: self.draft_models[spec] for spec in config.model_drafters}
                engine = Engine.from_models(config, self.target, drafts, batched=self.batched)
                self.batched = engine.batched  # the first engine's batch serves the others
                self.engines[method] = engine
            return self.engines[method]
