"""Streaming text: pieces concatenate to the final text; stop strings cut the text and end decoding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from swarmspec.engine import TextStream
from swarmspec.metrics import DecodeStats
from swarmspec.models.registry import DEFAULT_DRAFTER, resolve_model

pytestmark = pytest.mark.slow  # needs the packaged tokenizer (fetched with the drafter on first use)

TEXT = "def add(a, b):\n    return a + b  # naïve 加法\n\nprint(add(1, 2))\n"
EOS = 151645


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_DRAFTER))


def chunks_of(ids: list[int], sizes: Iterator[int]) -> Iterator[list[int]]:
    while ids:
        n = next(sizes)
        yield ids[:n]
        ids = ids[n:]


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: tuple[str, ...]) -> TextStream:
    sizes = iter([1, 3, 2] * len(ids))
    return TextStream(chunks_of(ids, sizes), tokenizer, stop, frozenset([EOS]), DecodeStats())


def test_pieces_concatenate_to_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = [*tokenizer(TEXT).input_ids, EOS]
    text_stream = stream(tokenizer, ids, stop=())
    pieces = list(text_stream)
    assert text_stream.result is not None
    assert "".join(pieces) == text_stream.result.text == TEXT
    assert text_stream.result.finish_reason == "stop"
    assert all("\ufffd" not in piece for piece in pieces)  # no split multi-byte characters


def test_stop_string_cuts_text_and_stops(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(TEXT).input_ids
    text_stream = stream(tokenizer, ids, stop=("print(",))
    pieces = list(text_stream)
    result = text_stream.result
    assert result is not None
    assert "".join(pieces) == result.text == TEXT[: TEXT.index("print(")]
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < len(ids)  # decoding ended early
    # Token ids stop with the returned text: they decode to it (the stop string's own tokens are gone).
    assert tokenizer.decode(result.token_ids) == result.text
    assert ids[: len(result.token_ids)] == result.token_ids


def test_no_stop_means_length(tokenizer: PreTrainedTokenizerBase) -> None:
    text_stream = stream(tokenizer, tokenizer(TEXT).input_ids, stop=("never appears",))
    assert "".join(text_stream) == TEXT
    assert text_stream.result is not None and text_stream.result.finish_reason == "length"
