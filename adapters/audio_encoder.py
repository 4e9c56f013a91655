"""The Whisper encoder of openai-whisper, taking any input up to 30 s and masking batch padding.

openai-whisper's ``AudioEncoder`` asserts 3000 mel frames (30 s). Here a clip of T frames adds the first
T/2 positional embeddings instead (same weights, ~10x less work for a 3 s clip), and padded frames of
shorter clips in a batch are masked out of attention, so a clip encodes the same alone or in a batch.
On an unpadded 30 s input the result equals the stock encoder's. Its layer norms compute in fp32 whatever
the weights' dtype (as openai-whisper's do on a GPU), so a model loaded in bfloat16 also hears on a CPU.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from whisper.model import AudioEncoder

from speechlm.adapters.configuration import SpeechLMAudioConfig

WHISPER_DIM_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
WHISPER_TEXT_DIM_FIELDS = ("n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


class FloatLayerNorm(nn.LayerNorm):
    """openai-whisper's LayerNorm computes in fp32 but leaves its weights in the model's dtype; a CPU refuses
    fp32 input with bf16/fp16 weights ("mixed dtype"). This one casts the weights as well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


logger = logging.getLogger(__name__)


def native_bfloat16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512
    BF16 or AMX (elsewhere torch's CPU bf16 matmuls fall back to a single-threaded GEMM, ~15x slower than
    float32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def encoder_precision(dtype: str, device_type: str):
    """The context the Whisper encoder runs in for ``audio_encoder_dtype``: bfloat16 autocast where the device
    has native bfloat16 (a CPU's encoding takes half the time), else float32 (with a warning)."""
    if dtype == "bfloat16":
        if native_bfloat16(device_type):
            return torch.autocast(device_type, dtype=torch.bfloat16)
        warn_float32_fallback("audio_encoder_dtype=bfloat16", "the encoder", device_type)
    return torch.autocast(device_type, enabled=False)


@functools.cache
def warn_float32_fallback(setting: str, part: str, device_type: str) -> None:  # once, not at every batch
    logger.warning("%s: this %s has no native bfloat16, so %s runs in float32", setting, device_type, part)


def use_float_layer_norms(module: nn.Module) -> None:
    """Replace every layer norm inside ``module`` by a `FloatLayerNorm` (fresh weights: call before loading)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm) and not isinstance(child, FloatLayerNorm):
                setattr(parent, name, FloatLayerNorm(child.normalized_shape, eps=child.eps))


class WhisperAudioEncoder(AudioEncoder):
    """``B, n_mels, T`` log-mel (T <= 2 * n_audio_ctx) -> ``B, ceil(T/2), n_audio_state`` frames at 50 Hz."""

    def __init__(self, config: SpeechLMAudioConfig):
        super().__init__(config.n_mels, config.n_audio_ctx, config.n_audio_state, config.n_audio_head,
                         config.n_audio_layer)
        self.n_head = config.n_audio_head
        use_float_layer_norms(self)

    def forward(self, input_features: torch.Tensor, mel_lengths: torch.Tensor | None = None) -> torch.Tensor:
        max_frames = 2 * self.positional_embedding.shape[0]
        if input_features.shape[-1] > max_frames:
            raise ValueError(f"audio features have {input_features.shape[-1]} mel frames but the Whisper encoder "
                             f"takes at most {max_frames} ({max_frames // 100} s); split longer audio")
        x = F.gelu(self.conv1(input_features))  # B, C, T
        key_mask = None
        if mel_lengths is not None and bool((mel_lengths < input_features.shape[-1]).any()):
            # conv2 must see zeros past a clip's end, as its own padding gives a clip encoded alone
            mel_mask = torch.arange(x.shape[-1], device=x.device)[None, :] < mel_lengths[:, None]  # B, T
            x = x * mel_mask.unsqueeze(1).to(x.dtype)
            key_mask = mel_mask[:, ::2]  # B, T/2: frame j is real iff mel frame 2j is
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)  # B, T/2, C
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in self.blocks:
            x = block(x) if key_mask is None else self._masked_block(block, x, key_mask)
        return self.ln_post(x)

    def _masked_block(self, block: torch.nn.Module, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Whisper's residual block with padded keys excluded from attention (the stock block takes no mask)."""
        attn = block.attn
        h = block.attn_ln(x)
        batch, length, width = h.shape
        q, k, v = (proj(h).view(batch, length, self.n_head, -1).transpose(1, 2)
                   for proj in (attn.query, attn.key, attn.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + attn.out(a.transpose(1, 2).reshape(batch, length, width))
        return x + block.mlp(block.mlp_ln(x))


def read_whisper_checkpoint(path: str | os.PathLike, part: str = "encoder") -> tuple[dict[str, int],
                                                                                   dict[str, torch.Tensor]]:
    """Read an openai-whisper ``.pt`` (``{"dims", "model_state_dict"}``) -> (dims, the state dict of ``part``,
    ``"encoder"`` or ``"decoder"``). The dims are the encoder's, and the decoder's where the file has them.

    Loaded with ``weights_only=True``: a checkpoint that needs pickled objects is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"openai-whisper checkpoint {path!r} does not exist (expected a .pt file with "
                                f"'dims' and 'model_state_dict', as written by openai-whisper)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable openai-whisper checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: an openai-whisper checkpoint holds 'dims' and 'model_state_dict'; found {found}")
    dims = checkpoint["dims"]
    missing = [name for name in WHISPER_DIM_FIELDS if name not in dims]
    if missing:
        raise ValueError(f"{path}: 'dims' lacks {missing}")
    state = {key.removeprefix(f"{part}."): value for key, value in checkpoint["model_state_dict"].items()
             if key.startswith(f"{part}.")}
    if not state:
        raise ValueError(f"{path}: 'model_state_dict' has no '{part}.*' weights"
                         + (" (an encoder-only checkpoint: the whisper reader needs a whole Whisper model)"
                            if part == "decoder" else ""))
    fields = [*WHISPER_DIM_FIELDS, *(name for name in WHISPER_TEXT_DIM_FIELDS if name in dims)]
    return {name: int(dims[name]) for name in fields}, state


def load_whisper_encoder(path: str | os.PathLike, config: SpeechLMAudioConfig | None = None) -> WhisperAudioEncoder:
    """A `WhisperAudioEncoder` with the weights of an openai-whisper checkpoint.

    With ``config`` given, the checkpoint's dims must match it; the error names both sides.
    """
    dims, state = read_whisper_checkpoint(path)
    if config is None:
        config = SpeechLMAudioConfig(**dims)
    check_whisper_dims(config, dims, path)
    encoder = WhisperAudioEncoder(config)
    encoder.load_state_dict(state, strict=True)
    return encoder


def check_whisper_dims(config: SpeechLMAudioConfig, dims: dict[str, int], source: str | os.PathLike,
                       fields: tuple[str, ...] = WHISPER_DIM_FIELDS) -> None:
    """Raise if a checkpoint's Whisper dims differ from ``config``, naming each field and both values."""
    mismatched = [f"{name}: checkpoint {dims.get(name)} vs config {getattr(config, name)}" for name in fields
                  if dims.get(name) != getattr(config, name)]
    if mismatched:
        raise ValueError(f"{os.fspath(source)}: Whisper dims differ from audio_config ({', '.join(mismatched)})")
