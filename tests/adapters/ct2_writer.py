"""A CTranslate2 ``model.bin`` writer for tests, mirroring ``ctranslate2/specs/model_spec.py``.

It lays out an openai-whisper state dict the way ct2-transformers-converter does (fused attention
projections, zero key biases, the output projection aliased to the embeddings), so the converter is
tested against files built independently of it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def whisper_to_ct2_variables(state: dict[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables (name -> tensor) of an openai-whisper state dict."""
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, prefix: str) -> None:
        out[f"{name}/weight"], out[f"{name}/bias"] = state[f"{prefix}.weight"], state[f"{prefix}.bias"]

    def norm(name: str, prefix: str) -> None:
        out[f"{name}/gamma"], out[f"{name}/beta"] = state[f"{prefix}.weight"], state[f"{prefix}.bias"]

    def fused(name: str, prefixes: list[str]) -> None:
        out[f"{name}/weight"] = torch.cat([state[f"{p}.weight"] for p in prefixes])
        out[f"{name}/bias"] = torch.cat([state.get(f"{p}.bias", torch.zeros_like(state[f"{p}.weight"][:, 0]))
                                         for p in prefixes])

    def block(name: str, prefix: str, cross: bool) -> None:
        fused(f"{name}/self_attention/linear_0", [f"{prefix}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{name}/self_attention/linear_1", f"{prefix}.attn.out")
        norm(f"{name}/self_attention/layer_norm", f"{prefix}.attn_ln")
        if cross:
            linear(f"{name}/attention/linear_0", f"{prefix}.cross_attn.query")
            fused(f"{name}/attention/linear_1", [f"{prefix}.cross_attn.{p}" for p in ("key", "value")])
            linear(f"{name}/attention/linear_2", f"{prefix}.cross_attn.out")
            norm(f"{name}/attention/layer_norm", f"{prefix}.cross_attn_ln")
        linear(f"{name}/ffn/linear_0", f"{prefix}.mlp.0")
        linear(f"{name}/ffn/linear_1", f"{prefix}.mlp.2")
        norm(f"{name}/ffn/layer_norm", f"{prefix}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    out["encoder/position_encodings/encodings"] = state["encoder.positional_embedding"]
    out["encoder/num_heads"] = torch.tensor(dims["n_audio_head"], dtype=torch.int16)
    for i in range(dims["n_audio_layer"]):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")

    out["decoder/embeddings/weight"] = state["decoder.token_embedding.weight"]
    out["decoder/position_encodings/encodings"] = state["decoder.positional_embedding"]
    out["decoder/num_heads"] = torch.tensor(dims["n_text_head"], dtype=torch.int16)
    for flag, value in {"activation": 3, "alibi": 0, "pre_norm": 1, "scale_embeddings": 0,
                        "start_from_zero_embedding": 0}.items():
        out[f"decoder/{flag}"] = torch.tensor(value, dtype=torch.int8)
    out["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    out["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int16)
    for i in range(dims["n_text_layer"]):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    return {name: value.detach().clone() for name, value in out.items()}


def write_ct2_model(path: str | Path, variables: dict[str, torch.Tensor], *, aliases: dict[str, str] | None = None,
                    spec: str = "WhisperSpec", revision: int = 3, binary_version: int = 6) -> Path:
    """Serialize like ``ModelSpec._serialize``: sorted variables, then aliases."""
    if aliases is None:
        aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        def string(text: str) -> None:
            data = text.encode("utf-8")
            file.write(struct.pack("<H", len(data) + 1) + data + b"\0")

        file.write(struct.pack("<I", binary_version))
        string(spec)
        file.write(struct.pack("<I", revision))
        file.write(struct.pack("<I", len(variables)))
        for name, value in sorted(variables.items()):
            value = value.contiguous()
            string(name)
            file.write(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
            raw = value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
            file.write(struct.pack("<BI", DTYPE_IDS[value.dtype], len(raw)) + raw)
        file.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            string(alias)
            string(target)
    return path


def quantize_int8(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2's int8 scheme (``LayerSpec._quantize``): per-row ``scale = 127 / max|row|`` on *weight."""
    out = dict(variables)
    for name, value in variables.items():
        if not name.endswith("weight") or not value.is_floating_point():
            continue
        rows = value.float().reshape(value.shape[0], -1)
        amax = rows.abs().amax(dim=1)
        amax[amax == 0] = 127.0
        scale = 127.0 / amax
        out[name] = torch.round(rows * scale[:, None]).to(torch.int8).reshape(value.shape)
        out[f"{name}_scale"] = scale
    return out
