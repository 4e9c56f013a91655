"""Speech units <-> token strings <-> token ids: the one place that knows the speech vocabulary layout.

The added vocabulary, in order, after the backbone's own tokens:
``<|audio|>`` (continuous-audio placeholder), ``<|speech_start|>``, ``<|speech_end|>``,
then ``<|s_0|>`` .. ``<|s_{N-1}|>`` for the N codes of the codec's first RVQ layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

AUDIO_TOKEN = "<|audio|>"
SPEECH_START_TOKEN = "<|speech_start|>"
SPEECH_END_TOKEN = "<|speech_end|>"
SPECIAL_SPEECH_TOKENS = (AUDIO_TOKEN, SPEECH_START_TOKEN, SPEECH_END_TOKEN)


def speech_token_ids(text_vocab_size: int) -> dict[str, int]:
    """The ids of ``<|audio|>``, ``<|speech_start|>``, ``<|speech_end|>`` and ``<|s_0|>`` when the added
    vocabulary starts at ``text_vocab_size`` (names as the model config records them)."""
    return {
        "audio_token_id": text_vocab_size,
        "speech_start_token_id": text_vocab_size + 1,
        "speech_end_token_id": text_vocab_size + 2,
        "speech_unit_start_id": text_vocab_size + len(SPECIAL_SPEECH_TOKENS),
    }


def speech_unit_token(unit: int) -> str:
    """The token string of one speech unit: ``7 -> "<|s_7|>"``."""
    return f"<|s_{int(unit)}|>"


def speech_unit_tokens(num_units: int) -> list[str]:
    """All unit token strings, ``<|s_0|>`` .. ``<|s_{num_units-1}|>``."""
    return [speech_unit_token(k) for k in range(num_units)]


def added_speech_tokens(num_units: int) -> list[str]:
    """Every token speechlm adds to a backbone's vocabulary, in id order."""
    return [*SPECIAL_SPEECH_TOKENS, *speech_unit_tokens(num_units)]


def units_to_text(units: Iterable[int], *, with_span: bool = True) -> str:
    """Units as token text, optionally wrapped in ``<|speech_start|>`` .. ``<|speech_end|>``."""
    body = "".join(speech_unit_token(u) for u in units)
    return f"{SPEECH_START_TOKEN}{body}{SPEECH_END_TOKEN}" if with_span else body


def token_ids_to_units(token_ids: Iterable[int], first_unit_id: int, num_units: int) -> list[int]:
    """The units among ``token_ids`` (ids of unit tokens), in order; other ids are skipped."""
    return [int(t) - first_unit_id for t in token_ids if first_unit_id <= int(t) < first_unit_id + num_units]


def expand_tokenizer(tokenizer: Any, num_speech_units: int) -> int:
    """Add ``<|audio|>``, ``<|speech_start|>``, ``<|speech_end|>`` and the unit tokens to ``tokenizer``.

    Returns ``text_vocab_size``, the id of the first added token. A tokenizer that already has them
    (a reloaded SpeechLM tokenizer) is left as it is, after checking their ids are contiguous.
    """
    tokens = added_speech_tokens(num_speech_units)
    vocab = tokenizer.get_vocab()
    if tokens[0] in vocab:
        first = vocab[tokens[0]]
        check_tokenizer_layout(tokenizer, first, num_speech_units, source="tokenizer")
        return first
    first = len(tokenizer)
    tokenizer.add_tokens(tokens[:3], special_tokens=True)
    # Unit tokens are ordinary added tokens: special ones would be dropped by skip_special_tokens.
    tokenizer.add_tokens(tokens[3:])
    check_tokenizer_layout(tokenizer, first, num_speech_units, source="tokenizer")
    return first


def check_tokenizer_layout(tokenizer: Any, text_vocab_size: int, num_speech_units: int,
                           *, source: str) -> None:
    """Raise if the tokenizer's added speech tokens are not at ``text_vocab_size ..`` in order."""
    tokens = added_speech_tokens(num_speech_units)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    expected = list(range(text_vocab_size, text_vocab_size + len(tokens)))
    if ids != expected:
        bad = next(i for i, (a, b) in enumerate(zip(ids, expected, strict=True)) if a != b)
        raise ValueError(f"{source}: token {tokens[bad]!r} has id {ids[bad]} but the model config puts it at "
                         f"{expected[bad]} (text_vocab_size={text_vocab_size}, num_speech_units="
                         f"{num_speech_units}); the tokenizer and the model come from different checkpoints")
    extra = len(tokenizer) - expected[-1] - 1
    if extra:
        raise ValueError(f"{source}: has {len(tokenizer)} tokens but the model config expects "
                         f"{expected[-1] + 1} ({text_vocab_size} text + {len(tokens)} speech tokens)")
