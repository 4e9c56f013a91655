"""Fails loudly when speechtokenizer's layout moves away from what speech_io.codec relies on
(`speech_io/codec_upstream.py` imports it, `codec_batching.py` and `codec_streaming.py` walk its modules)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import torch

from speechlm.speech_io.codec import CodecConfig
from speechlm.speech_io.codec_upstream import import_speechtokenizer_model


def test_files_and_config_keys():
    root = Path(importlib.util.find_spec("speechtokenizer").submodule_search_locations[0])
    for relative in ("model.py", "modules/seanet.py", "modules/conv.py", "modules/lstm.py",
                     "quantization/core_vq.py"):
        assert (root / relative).is_file(), f"speechtokenizer/{relative} moved; pin speechtokenizer==1.0.1"
    model = import_speechtokenizer_model()
    read = set(re.findall(r"config\.get\('(\w+)'\)", inspect.getsource(model.SpeechTokenizer.__init__)))
    assert read == {f.name for f in dataclasses.fields(CodecConfig)}
    assert "speechtokenizer.trainer" not in sys.modules  # the workaround never ran the package __init__


def test_codebook_buffers(narrow_codec):
    book = narrow_codec.model.quantizer.vq.layers[0]._codebook
    assert {name for name, _ in book.named_buffers()} == {"inited", "cluster_size", "embed", "embed_avg"}
    assert isinstance(narrow_codec.model.quantizer.vq.layers[0].project_in, torch.nn.Identity)


def test_matches_upstream_forward(narrow_codec, clips):
    """Our layer-by-layer batched path computes what upstream's own forward does, item by item.

    Compared as floats, to 1e-5 of the latents' size: upstream's one-row LSTM and convolutions round
    differently from our batches, by a few float32 ulps per layer (up to 1.2e-6 on one CPU's kernels, under
    3e-7 on another's); a layout that moved would be off by the latents' own size.
    """
    latents = narrow_codec._latents(clips, batch_size=8)
    with torch.inference_mode():
        for clip, latent in zip(clips, latents, strict=True):
            upstream = narrow_codec.model.encoder(torch.from_numpy(clip)[None, None])[0]
            assert torch.allclose(upstream, latent, atol=1e-5 * upstream.abs().max().item(), rtol=0)
        for codes in narrow_codec.encode(clips):
            wav = narrow_codec.model.decode(torch.from_numpy(codes)[:, None])[0, 0].numpy()
            assert np.allclose(wav, narrow_codec.decode(codes), atol=1e-6)
