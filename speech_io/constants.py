"""Fixed facts of the Whisper front end that the processor and the model must agree on."""

from __future__ import annotations

SAMPLE_RATE = 16_000
# Labels at positions that take no loss (torch's cross-entropy ignore_index).
IGNORE_INDEX = -100
# Whisper's STFT hop: 160 samples = 10 ms, so 100 mel frames a second.
MEL_HOP_LENGTH = 160
# 30 s, the longest input a Whisper encoder has positional embeddings for.
MAX_MEL_FRAMES = 3000


def mel_frames(num_samples: int) -> int:
    """Mel frames for ``num_samples`` of 16 kHz audio (Whisper drops the STFT's last frame)."""
    return num_samples // MEL_HOP_LENGTH


# The arithmetic below is written with // so that it works on ints and on tensors of lengths alike.


def encoder_frames(num_mel_frames):
    """Whisper encoder outputs for ``num_mel_frames`` inputs: its second conv has stride 2 (50 Hz)."""
    return (num_mel_frames + 1) // 2


def stacked_frames(num_frames, stack_factor: int):
    """Frames left after stacking ``stack_factor`` neighbours; a partial last group is zero-padded."""
    return (num_frames + stack_factor - 1) // stack_factor


def reader_slot_count(num_mel_frames, tokens_per_second: int):
    """Positions a reader's transcript of a clip may fill: ``tokens_per_second`` a second of audio, rounded
    up, and 4 more (a word or two of a very short clip); none without a reader (``tokens_per_second=0``)."""
    if not tokens_per_second:
        return num_mel_frames * 0
    return (num_mel_frames * tokens_per_second + 99) // 100 + 4


def audio_placeholder_count(num_mel_frames, stack_factor: int, reader_tokens_per_second: int = 0):
    """How many ``<|audio|>`` positions a clip of ``num_mel_frames`` fills: the projected frames, then the
    reader's transcript slots, if the model has a reader."""
    return (stacked_frames(encoder_frames(num_mel_frames), stack_factor)
            + reader_slot_count(num_mel_frames, reader_tokens_per_second))
