"""Convert a CTranslate2 Whisper model (faster-whisper's format) to openai-whisper's ``.pt``.

CTranslate2 stores Whisper with fused projections: self-attention ``linear_0`` is query, key and value
stacked (``3D x D``), cross-attention ``linear_0`` is the query and ``linear_1`` key and value stacked.
openai-whisper's key projections have no bias; CTranslate2 fills that slot with zeros. A nonzero key
bias is dropped on purpose: it adds the same ``q . b`` to every key's score, which softmax cancels.

The output is ``{"dims": ModelDimensions fields, "model_state_dict": ...}``, which
``whisper.load_model(path)`` and `speechlm.adapters.audio_encoder.load_whisper_encoder` both read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from whisper.model import AudioEncoder, ModelDimensions, TextDecoder

from speechlm.adapters.ct2_format import CT2FormatError, CT2Model, dequantize, read_ct2_model

OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Scalars of CTranslate2's TransformerDecoderSpec and the values openai-whisper's decoder has; anything
# else (ALiBi, post-norm, scaled embeddings...) is a model openai-whisper cannot represent.
_DECODER_FLAGS = {"activation": 3, "pre_norm": 1, "scale_embeddings": 0, "alibi": 0,
                  "start_from_zero_embedding": 0, "multi_query_attention": 0}
# Read for information only: alignment heads drive word timestamps, which openai-whisper sets apart.
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer", "decoder/alibi_use_positive_positions",
            "decoder/scale_alibi", "encoder/num_heads", "decoder/num_heads"}
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


def find_ct2_files(src: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The ``model.bin`` file(s) of a CTranslate2 model directory, or the given part files in order.

    A directory holds ``model.bin`` or ``model.bin.part1``, ``model.bin.part2``, ... (numeric order).
    """
    if not isinstance(src, (str, os.PathLike)):
        return [Path(p) for p in src]
    path = Path(src)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such CTranslate2 model directory or model.bin file")
    if (path / "model.bin").is_file():
        return [path / "model.bin"]
    parts = sorted(path.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
    if not parts:
        raise FileNotFoundError(f"{path}: holds no model.bin (nor model.bin.part1, ...); expected a CTranslate2 "
                                f"model directory as written by ct2-transformers-converter")
    return parts


def convert_whisper_ct2(src: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        dtype: str = "float16") -> Path:
    """Read a CTranslate2 Whisper model (directory, ``model.bin``, or ordered part files) and save
    openai-whisper's ``.pt`` at ``out``; returns ``out``."""
    files = find_ct2_files(src)
    checkpoint = ct2_whisper_to_openai(read_ct2_model(files), dtype=dtype,
                                       vocabulary=_find_vocabulary(files[0].parent))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def ct2_whisper_to_openai(model: CT2Model, *, dtype: str = "float16", vocabulary: Path | None = None) -> dict:
    """``{"dims", "model_state_dict"}`` of openai-whisper from a CTranslate2 ``WhisperSpec`` model.

    Float weights become ``dtype`` (float16 or float32); int8/int16 weights are dequantized first.
    If ``vocabulary`` (vocabulary.txt / .json beside model.bin) is given, its size must match the embeddings.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(OUTPUT_DTYPES)}")
    if model.spec_name and model.spec_name != "WhisperSpec":
        raise CT2FormatError(f"{model.source}: holds a CTranslate2 {model.spec_name}; expected a WhisperSpec model")
    variables = dequantize(model)
    dims = _infer_dims(model.source, variables)
    if vocabulary is not None:
        _check_vocabulary(vocabulary, dims.n_vocab)
    mapper = _Mapper(model.source, variables, OUTPUT_DTYPES[dtype])
    state = {f"encoder.{key}": value for key, value in mapper.encoder(dims.n_audio_layer).items()}
    if dims.n_text_layer:
        state.update({f"decoder.{key}": value for key, value in mapper.decoder(dims.n_text_layer).items()})
    mapper.check_all_used()
    _check_shapes(model.source, state, dims)
    return {"dims": dims.__dict__, "model_state_dict": state}


class _Mapper:
    """Takes CTranslate2 variables by name, each once; what is left over at the end is an error."""

    def __init__(self, source: str, variables: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.source, self.variables, self.dtype = source, variables, dtype
        self.used: set[str] = set(_IGNORED)

    def take(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise CT2FormatError(f"{self.source}: variable {name} is missing; a CTranslate2 Whisper model has it")
        self.used.add(name)
        value = self.variables[name]
        if not value.is_floating_point():
            raise CT2FormatError(f"{self.source}: variable {name} has dtype {value.dtype} without a *_scale "
                                 f"to dequantize it; expected floats")
        return value

    def out(self, value: torch.Tensor) -> torch.Tensor:
        # clone: a slice of a fused weight would otherwise save its whole parent storage
        return value.to(self.dtype).clone()

    def linear(self, prefix: str, name: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": self.out(self.take(f"{name}/weight")),
                f"{prefix}.bias": self.out(self.take(f"{name}/bias"))}

    def layer_norm(self, prefix: str, name: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": self.out(self.take(f"{name}/gamma")),
                f"{prefix}.bias": self.out(self.take(f"{name}/beta"))}

    def fused(self, names: Sequence[str], name: str) -> dict[str, torch.Tensor]:
        """Split a stacked projection (rows: one block per name) into openai-whisper's separate ones."""
        weight, bias = self.take(f"{name}/weight"), self.take(f"{name}/bias")
        if weight.shape[0] % len(names) or bias.shape[0] != weight.shape[0]:
            raise CT2FormatError(f"{self.source}: {name}/weight has shape {list(weight.shape)} and bias "
                                 f"{list(bias.shape)}; expected {len(names)} stacked square projections")
        state = {}
        for block, (w, b) in enumerate(zip(weight.chunk(len(names)), bias.chunk(len(names)), strict=True)):
            state[f"{names[block]}.weight"] = self.out(w)
            if not names[block].endswith("key"):  # see the module docstring: the key bias cancels
                state[f"{names[block]}.bias"] = self.out(b)
        return state

    def block(self, prefix: str, name: str, *, cross: bool) -> dict[str, torch.Tensor]:
        state = {**self.fused([f"{prefix}.attn.query", f"{prefix}.attn.key", f"{prefix}.attn.value"],
                              f"{name}/self_attention/linear_0"),
                 **self.linear(f"{prefix}.attn.out", f"{name}/self_attention/linear_1"),
                 **self.layer_norm(f"{prefix}.attn_ln", f"{name}/self_attention/layer_norm")}
        if cross:
            state.update({**self.linear(f"{prefix}.cross_attn.query", f"{name}/attention/linear_0"),
                          **self.fused([f"{prefix}.cross_attn.key", f"{prefix}.cross_attn.value"],
                                       f"{name}/attention/linear_1"),
                          **self.linear(f"{prefix}.cross_attn.out", f"{name}/attention/linear_2"),
                          **self.layer_norm(f"{prefix}.cross_attn_ln", f"{name}/attention/layer_norm")})
        state.update({**self.linear(f"{prefix}.mlp.0", f"{name}/ffn/linear_0"),
                      **self.linear(f"{prefix}.mlp.2", f"{name}/ffn/linear_1"),
                      **self.layer_norm(f"{prefix}.mlp_ln", f"{name}/ffn/layer_norm")})
        return state

    def encoder(self, layers: int) -> dict[str, torch.Tensor]:
        state = {"positional_embedding": self.out(self.take("encoder/position_encodings/encodings")),
                 **self.linear("conv1", "encoder/conv1"), **self.linear("conv2", "encoder/conv2")}
        for i in range(layers):
            state.update(self.block(f"blocks.{i}", f"encoder/layer_{i}", cross=False))
        state.update(self.layer_norm("ln_post", "encoder/layer_norm"))
        return state

    def decoder(self, layers: int) -> dict[str, torch.Tensor]:
        for flag, expected in _DECODER_FLAGS.items():
            name = f"decoder/{flag}"
            if name in self.variables:
                self.used.add(name)
                if int(self.variables[name]) != expected:
                    raise CT2FormatError(f"{self.source}: {name} is {int(self.variables[name])}; openai-whisper's "
                                         f"decoder needs {expected}")
        embeddings = self.take("decoder/embeddings/weight")
        # openai-whisper computes logits with the token embeddings; CTranslate2 keeps an aliased projection.
        if "decoder/projection/weight" in self.variables:
            projection = self.take("decoder/projection/weight")
            if projection is not embeddings and not torch.equal(projection, embeddings):
                raise CT2FormatError(f"{self.source}: decoder/projection/weight differs from "
                                     f"decoder/embeddings/weight; openai-whisper ties them")
        if "decoder/projection/bias" in self.variables:
            raise CT2FormatError(f"{self.source}: decoder/projection/bias exists; openai-whisper's output "
                                 f"projection has no bias")
        state = {"token_embedding.weight": self.out(embeddings),
                 "positional_embedding": self.out(self.take("decoder/position_encodings/encodings"))}
        for i in range(layers):
            state.update(self.block(f"blocks.{i}", f"decoder/layer_{i}", cross=True))
        state.update(self.layer_norm("ln", "decoder/layer_norm"))
        return state

    def check_all_used(self) -> None:
        unknown = sorted(set(self.variables) - self.used)
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise CT2FormatError(f"{self.source}: unknown variable(s) {shown}; openai-whisper's Whisper has no "
                                 f"place for them (is this a Whisper model of another architecture?)")


def _infer_dims(source: str, variables: dict[str, torch.Tensor]) -> ModelDimensions:
    def shape(name: str) -> list[int]:
        if name not in variables:
            raise CT2FormatError(f"{source}: variable {name} is missing; a CTranslate2 Whisper model has it")
        return list(variables[name].shape)

    def layers(side: str) -> int:
        found = sorted({int(m.group(2)) for name in variables if (m := _LAYER.match(name)) and m.group(1) == side})
        if found != list(range(len(found))):
            raise CT2FormatError(f"{source}: {side} layers {found} are not numbered 0..n-1")
        return len(found)

    def heads(side: str) -> int:
        name = f"{side}/num_heads"
        if name not in variables or variables[name].numel() != 1:
            raise CT2FormatError(f"{source}: {name} is missing or not a scalar; expected the head count")
        return int(variables[name])

    n_audio_state, n_mels, _ = shape("encoder/conv1/weight")
    has_decoder = any(name.startswith("decoder/") for name in variables)
    if has_decoder:
        n_vocab, n_text_state = shape("decoder/embeddings/weight")
        n_text_ctx = shape("decoder/position_encodings/encodings")[0]
        n_text_head, n_text_layer = heads("decoder"), layers("decoder")
    else:  # an encoder-only file: speechlm loads it, openai-whisper cannot decode with it
        n_vocab = n_text_state = n_text_ctx = n_text_head = n_text_layer = 0
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=shape("encoder/position_encodings/encodings")[0],
                           n_audio_state=n_audio_state, n_audio_head=heads("encoder"),
                           n_audio_layer=layers("encoder"), n_vocab=n_vocab, n_text_ctx=n_text_ctx,
                           n_text_state=n_text_state, n_text_head=n_text_head, n_text_layer=n_text_layer)


def _check_shapes(source: str, state: dict[str, torch.Tensor], dims: ModelDimensions) -> None:
    """Every tensor has the shape openai-whisper's modules (built on the meta device) expect."""
    with torch.device("meta"):
        expected = {f"encoder.{k}": v for k, v in AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        ).state_dict().items()}
        if dims.n_text_layer:
            expected.update({f"decoder.{k}": v for k, v in TextDecoder(
                dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
            ).state_dict().items()})
    missing = sorted(set(expected) - set(state))
    assert not missing and set(state) == set(expected), missing  # the mapping above covers every module
    wrong = [f"{key}: {list(state[key].shape)} (expected {list(value.shape)})" for key, value in expected.items()
             if state[key].shape != value.shape]
    if wrong:
        raise CT2FormatError(f"{source}: shape mismatch for dims {dims.__dict__}: " + "; ".join(wrong[:6]))


def _find_vocabulary(directory: Path) -> Path | None:
    for name in ("vocabulary.json", "vocabulary.txt"):
        if (directory / name).is_file():
            return directory / name
    return None


def _check_vocabulary(path: Path, n_vocab: int) -> None:
    if path.suffix == ".json":
        size = len(json.loads(path.read_text(encoding="utf-8")))
    else:
        text = path.read_text(encoding="utf-8")
        # one token per line; split on "\n" only, as byte-level tokens may hold other line-break characters
        size = len(text.split("\n")) - text.endswith("\n")
    if size != n_vocab:
        raise CT2FormatError(f"{path}: {size} tokens, but the model's embeddings have {n_vocab} rows; "
                             f"the vocabulary and model.bin belong to different models")
