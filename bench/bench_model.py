"""Model benchmarks (run by hand; figures go to BENCHMARKS.md with this command).

    python bench/bench_model.py [--repeats 5] [--new-tokens 64]

1. Generation overhead: tokens/s of SpeechLMForCausalLM.generate (text prompt, audio prompt) against the
   bare backbone's generate for the same prompt length and token count, in the same run; end to end
   (the audio prompt's includes encoding the clip) and in the decode phase alone.
2. Encoder length: a 3 s clip vs the same clip padded to 30 s through a Whisper-base-sized encoder.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from speechlm.adapters.audio_encoder import WhisperAudioEncoder
from speechlm.adapters.building import ModelSpec, build_speechlm
from speechlm.adapters.configuration import SpeechLMAudioConfig
from speechlm.adapters.tiny import build_byte_tokenizer

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000)
WHISPER_BASE = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6)


def save_small_backbone(directory: str) -> str:
    """A Llama checkpoint directory with a Llama-2-sized vocabulary (32000), so that the speech rows
    weigh against the text head as they would in a real model."""
    tokenizer = build_byte_tokenizer()
    tokenizer.add_tokens([f"<filler_{i}>" for i in range(SMALL_LLAMA["vocab_size"] - len(tokenizer))])
    config = LlamaConfig(**SMALL_LLAMA, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, run alternately so that load from elsewhere hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def generation_overhead(repeats: int, new_tokens: int) -> list[tuple[str, float, float, float, float]]:
    """Per prompt kind: (name, ours end-to-end tok/s, backbone end-to-end tok/s, ours decode tok/s,
    backbone decode tok/s). Decode rates exclude the prefill (time for N tokens minus time for 1)."""
    backbone_dir = save_small_backbone(tempfile.mkdtemp())
    model, tokenizer = build_speechlm(ModelSpec(text_model=backbone_dir, audio=WHISPER_BASE,
                                                projector={"stack_factor": 5, "hidden_size": 512}))
    model.eval()
    backbone = AutoModelForCausalLM.from_config(model.text_model.config).eval()
    backbone.load_state_dict(model.text_model.state_dict())

    text_ids = torch.tensor([tokenizer("Tell me a story about a robot who learns to sing.").input_ids])
    mel_frames = 300  # a 3 s clip
    placeholders = int(model.audio_lengths(torch.tensor(mel_frames)))
    audio_ids = torch.cat([text_ids, torch.full((1, placeholders), model.config.audio_token_id)], dim=1)
    features = torch.randn(1, 80, mel_frames)
    same_length_text = torch.randint(0, 250, audio_ids.shape)

    def run(generate, inputs, tokens):
        return lambda: generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    rows = []
    with torch.no_grad():
        for name, ours_inputs, theirs_inputs in (
            ("text prompt", {"input_ids": text_ids}, {"input_ids": text_ids}),
            ("audio prompt (3 s)", {"input_ids": audio_ids, "input_features": features},
             {"input_ids": same_length_text}),
        ):
            ours_whole, theirs_whole, ours_first, theirs_first = timed(
                [run(model.generate, ours_inputs, new_tokens), run(backbone.generate, theirs_inputs, new_tokens),
                 run(model.generate, ours_inputs, 1), run(backbone.generate, theirs_inputs, 1)], repeats)
            rows.append((name, new_tokens / ours_whole, new_tokens / theirs_whole,
                         (new_tokens - 1) / (ours_whole - ours_first),
                         (new_tokens - 1) / (theirs_whole - theirs_first)))
    return rows


def encoder_length(repeats: int) -> tuple[float, float]:
    encoder = WhisperAudioEncoder(SpeechLMAudioConfig(**WHISPER_BASE)).eval()
    clip = torch.randn(1, 80, 300)
    padded = torch.zeros(1, 80, 3000)
    padded[..., :300] = clip
    with torch.no_grad():
        short, full = timed([lambda: encoder(clip), lambda: encoder(padded)], repeats)
    return short, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("\n| prompt | speechlm tok/s | backbone tok/s | end-to-end ratio | speechlm decode tok/s "
          "| backbone decode tok/s | decode ratio (goal >= 0.97) |\n|---|---|---|---|---|---|---|")
    for name, ours, theirs, ours_decode, theirs_decode in generation_overhead(args.repeats, args.new_tokens):
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.3f} | {ours_decode:.1f} "
              f"| {theirs_decode:.1f} | {ours_decode / theirs_decode:.3f} |")
    short, full = encoder_length(args.repeats)
    print("\n| Whisper-base encoder | seconds |\n|---|---|")
    print(f"| 3 s clip | {short:.4f} |\n| same clip padded to 30 s | {full:.4f} |")
    print(f"| ratio (goal <= 0.15) | {short / full:.3f} |")


if __name__ == "__main__":
    main()
