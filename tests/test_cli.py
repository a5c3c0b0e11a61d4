"""User mistakes get one clear error line and exit status 2, never a traceback; nothing is loaded first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarmspec.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", ""], "the prompt is empty"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["generate", "hi", "--max-new-tokens", "-3"], "max_new_tokens must be >= 1"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--top-k", "-2"], "top_k must be >= 0"),
        (["generate", "hi", "--gamma", "0"], "gamma must be >= 1 or 'auto'"),
        (["generate", "hi", "--target", "no-such-model"], "no model 'no-such-model'"),
        (
            ["generate", "hi", "--method", "chain", "--drafter", "int8:no-such-model"],
            "no model 'no-such-model'",
        ),
        (["fetch", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "hi", "--tree", "3,2"], "--tree and --tree-budget need --method tree, not chain"),
        (["generate", "hi", "--tree-budget", "8", "--method", "vote"], "need --method tree, not vote"),
        (["generate", "hi", "--method", "tree", "--tree", "2", "--tree-budget", "8"], "not both"),
        (["generate", "hi", "--method", "tree", "--tree-budget", "-1"], "--tree-budget must be >= 1"),
        (["generate", "hi", "--method", "tree", "--tree", "3,0"], "tree widths must be >= 1"),
        (
            ["generate", "hi", "--method", "tree", "--tree", "2", "--drafter", "prompt-lookup"],
            "--tree and --tree-budget grow the tree from a model drafter",
        ),
        (
            ["generate", "hi", "--drafter", "prompt-lookup", "--drafter", "suffix"],
            "chain takes one drafter, got 2",
        ),
        (
            [
                "generate",
                "hi",
                "--method",
                "tree",
                "--drafter",
                "prompt-lookup",
                "--drafter",
                "no-such-model",
            ],
            "no model 'no-such-model'",
        ),
        (["bench", "--questions", "/no/such/q.jsonl"], "question file /no/such/q.jsonl does not exist"),
        (["bench", "--methods", "ar,beam"], "unknown methods or baselines: beam"),
        (["bench", "--baselines", "vllm"], "unknown methods or baselines: vllm"),
        (["bench", "--methods", "", "--baselines", ""], "nothing to benchmark"),
        (["bench", "--repeats", "0"], "repeats must be >= 1"),
        (["bench", "--methods", "chain", "--tree-budget", "8"], "a tree variant takes tree="),
        (["bench", "--methods", "tree", "--tree-budget", "0", "--tree", "2,0"], "tree widths must be >= 1"),
        (["bench", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["bench", "--per-category", "0"], "--per-category must be >= 1"),
        (["bench", "--categories", "poetry"], "unknown categories poetry"),
        (["bench", "--temperature", "-1"], "temperature must be"),
        (["bench", "--drafter", "no-such-model"], "no model 'no-such-model'"),
        (["bench", "--variant", "chain-g6"], "a variant is NAME:method=M,key=value,..."),
        (["bench", "--variant", "g6:gamma=6"], "variant g6: no method"),
        (["bench", "--variant", "g6:method=beam"], "variant g6: unknown method 'beam'"),
        (["bench", "--variant", "g6:method=chain,speed=6"], "variant g6: unknown or repeated key 'speed'"),
        (["bench", "--variant", "g6:method=chain,gamma=6,gamma=7"], "unknown or repeated key 'gamma'"),
        (["bench", "--variant", "g6:method=chain,gamma=six"], "variant g6: gamma='six' is not a valid value"),
        (["bench", "--variant", "g6:method=chain,gamma=0"], "variant g6: gamma must be >= 1 or 'auto'"),
        (["bench", "--variant", "chain:method=chain,gamma=6"], "variant chain: a method's or a baseline's"),
        (["bench", "--variant", "llama-cpp:method=chain"], "variant llama-cpp: a method's or a baseline's"),
        (["bench", "--variant", "a:method=ar", "--variant", "a:method=chain"], "given more than once: a"),
        (["bench", "--variant", "g6:method=chain,drafters=a,b"], "variant g6: chain takes one drafter"),
        (["generate", "hi", "--method", "dsi", "--targets", "0"], "--targets and --lookahead must be >= 1"),
        (["generate", "hi", "--method", "dsi", "--lookahead", "0"], "--targets and --lookahead must be >= 1"),
        (
            ["generate", "hi", "--method", "dsi", "--drafter", "prompt-lookup", "--drafter", "suffix"],
            "dsi takes one drafter, got 2",
        ),
        (
            ["generate", "hi", "--method", "pipeline", "--drafter", "prompt-lookup"],
            "draft in microseconds: use --method chain",
        ),
        (["generate", "hi", "--method", "pipeline", "--workers", "ray"], "pipeline runs on threads"),
        (["serve", "--method", "pipeline", "--max-batch", "4"], "continuous batching"),
        (["serve", "--model-name", "a", "--model-name", "b"], "2 --model-name for 1 --target"),
        (["serve", "--max-batch", "4", "--prefill-chunk", "64"], "512-token calls plain decoding makes"),
        (["serve", "--target", "x", "--prefill-chunk", "0"], "--prefill-chunk takes a token count >= 1"),
        (["serve", "--target", "x", "--target", "x"], "each served model needs its own name, got ['x', 'x']"),
        (["simulate", "--target", "x"], "a trace needs both --target and --drafter"),
        (["simulate", "--acceptances", "0.5,1.5"], "acceptance rates must be in [0, 1]"),
        (["simulate", "--lookaheads", "0"], "targets, drafters, tokens and lookaheads must be >= 1"),
    ],
)
def test_user_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("swarmspec: error: ")
    assert message in last_line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--method", "beam"], "invalid choice: 'beam'"),
        (["generate", "hi", "--gamma", "lots"], "expected a number of tokens or auto, got 'lots'"),
    ],
)
def test_flag_values_are_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_prints_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmspec.cli", "generate", "hi", "--target", "nope/not-a-dir/x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "swarmspec: error: no model 'nope/not-a-dir/x'" in result.stderr


def test_dsi_flags_map_onto_the_engine_config() -> None:
    from swarmspec.cli import build_parser, engine_config

    args = build_parser().parse_args(
        ["generate", "hi", "--method", "dsi", "--targets", "3", "--lookahead", "2", "--workers", "ray",
         "--ray-address", "auto", "--drafter", "prompt-lookup"]
    )  # fmt: skip
    config = engine_config(args)
    assert (config.targets, config.lookahead, config.workers, config.ray_address) == (3, 2, "ray", "auto")
    assert config.drafters == ("prompt-lookup",)


def test_bench_variants_are_methods_with_settings_of_their_own() -> None:
    from swarmspec.config import BenchConfig

    model = "llamacpp:qwen2.5-coder-0.5b-instruct"
    bench = BenchConfig(
        methods=("ar", "chain"),
        drafters=("prompt-lookup", model),
        gamma=3,
        variants=(
            "chain-g6:method=chain,gamma=6",
            f"tree-3211:method=tree,drafters={model},prompt-lookup,suffix,tree=3,2,1,1,max-depth=8",
        ),
    )
    configs = dict(bench.contender_configs())
    assert list(configs) == ["ar", "chain", "chain-g6", "tree-3211"]
    assert (configs["chain"].gamma, configs["chain-g6"].gamma) == (3, 6)
    assert configs["chain-g6"].drafters == configs["chain"].drafters == ("prompt-lookup",)
    tree = configs["tree-3211"]
    assert (tree.method, tree.drafters) == ("tree", (model, "prompt-lookup", "suffix"))
    assert (tree.tree_widths, tree.max_depth, tree.gamma) == ((3, 2, 1, 1), 8, 3)
    assert bench.model_drafters == (model,)  # what the variants need is loaded too

    # A variant is built once from the bench's flags and its own settings, so what it changes cannot
    # clash with what it replaces: one tree shape replaces the other, an empty one merges chains.
    shaped = BenchConfig(
        methods=("tree",),
        drafters=(model, "prompt-lookup"),
        tree_budget=8,
        variants=(
            "widths:method=tree,tree=3,2,1",
            "merged:method=tree,tree=",
            f"pipe:method=pipeline,drafters={model}",
            "spaced:method=vote, drafters=prompt-lookup, suffix , gamma = 4",
        ),
    )
    configs = dict(shaped.contender_configs())
    assert (configs["tree"].tree_widths, configs["tree"].tree_budget) == ((), 8)
    assert (configs["widths"].tree_widths, configs["widths"].tree_budget) == ((3, 2, 1), 0)
    assert (configs["merged"].tree_widths, configs["merged"].tree_budget) == ((), 0)
    assert configs["pipe"].drafters == (model,)
    assert (configs["spaced"].drafters, configs["spaced"].gamma) == (("prompt-lookup", "suffix"), 4)


def test_bench_methods_take_their_drafters_from_the_given_ones() -> None:
    from swarmspec.config import BenchConfig

    model = "llamacpp:qwen2.5-coder-0.5b-instruct"
    bench = BenchConfig(drafters=("prompt-lookup", model, "suffix"))
    drafters = {method: bench.engine_config(method).drafters for method in bench.methods}
    assert drafters == {
        "ar": (),
        "chain": ("prompt-lookup",),
        "tree": ("prompt-lookup", model, "suffix"),
        "vote": ("prompt-lookup", model, "suffix"),
        "dsi": ("prompt-lookup",),
        "pipeline": (model,),  # the first draft model: the pipeline overlaps a model's drafting
    }
