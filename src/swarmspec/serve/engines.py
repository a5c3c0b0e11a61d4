"""The server's engines: the models loaded once, an engine per speculation method built on first use."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace

from swarmspec.config import EngineConfig, GenerationRequest, default_drafters, method_drafters
from swarmspec.decode import check_fits
from swarmspec.engine import Engine, encode_request
from swarmspec.models.loading import LoadedModel, check_spec, load_model


class MethodEngines:
    """Engines over one target, one per method (a request may choose its method). The configured
    drafters serve every method (chain takes the first); without drafters each method gets its default.
    Models are loaded once, when the first engine needing them is built."""

    def __init__(
        self,
        config: EngineConfig,
        target: LoadedModel | None = None,
        draft_models: Mapping[str, LoadedModel] | None = None,
    ) -> None:
        self.config = config
        # Drafters the user chose serve every method; the method's defaults only the configured method.
        default = default_drafters(config.method, config.target)
        self.given_drafters = () if config.method == "ar" or config.drafters == default else config.drafters
        self.target = target or load_model(config.target)
        self.draft_models = dict(draft_models or {})
        self.engines: dict[str, Engine] = {}
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
                for spec in config.model_drafters:
                    if spec not in self.draft_models:
                        check_spec(spec)
                        self.draft_models[spec] = load_model(spec)
                self.engines[method] = Engine.from_models(config, self.target, self.draft_models)
            return self.engines[method]
