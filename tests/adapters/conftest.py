from __future__ import annotations

import pytest
import torch

from speechlm.adapters.building import build_speechlm
from tests.conftest import tiny_spec


@pytest.fixture
def tiny(request):
    """A tiny random SpeechLM (eval mode) and its expanded byte-level tokenizer."""
    model, tokenizer = build_speechlm(tiny_spec())
    return model.eval(), tokenizer


def audio_inputs(model, tokenizer, mel_lengths: list[int], *, text: str = "hi", seed: int = 0):
    """One row per clip: ``text`` + the clip's <|audio|> placeholders + ``text``, right-padded, with
    features padded to the longest clip (the layout SpeechLMProcessor produces)."""
    generator = torch.Generator().manual_seed(seed)
    n_mels = model.config.audio_config.n_mels
    longest = max(mel_lengths)
    features = torch.zeros(len(mel_lengths), n_mels, longest)
    mask = torch.zeros(len(mel_lengths), longest, dtype=torch.long)
    rows = []
    for i, length in enumerate(mel_lengths):
        features[i, :, :length] = torch.randn(n_mels, length, generator=generator)
        mask[i, :length] = 1
        count = int(model.audio_lengths(torch.tensor(length)))
        text_ids = tokenizer(text).input_ids
        rows.append(text_ids + [model.config.audio_token_id] * count + text_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features, input_features_mask=mask)
    return {name: tensor.to(model.device) for name, tensor in inputs.items()}  # a qlora backbone sits on the GPU
