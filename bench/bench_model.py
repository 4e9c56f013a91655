"""Model benchmarks (run by hand; figures go to BENCHMARKS.md with this command).

    python bench/bench_model.py [--repeats 5] [--new-tokens 64]

1. Generation overhead: tokens/s of SpeechLMForCausalLM.generate (text prompt, audio prompt) against the
   bare backbone's generate for the same prompt length and token count, in the same run.
2. Encoder length: a 3 s clip vs the same clip padded to 30 s through a Whisper-base-sized encoder.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from speechlm.adapters.audio_encoder import WhisperAudioEncoder
from speechlm.adapters.building import ModelSpec, build_speechlm
from speechlm.adapters.configuration import SpeechLMAudioConfig

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048)
WHISPER_BASE = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_overhead(repeats: int, new_tokens: int) -> list[tuple[str, float, float]]:
    model, tokenizer = build_speechlm(ModelSpec(text=SMALL_LLAMA, audio=WHISPER_BASE,
                                                projector={"stack_factor": 5, "hidden_size": 512}))
    model.eval()
    backbone = AutoModelForCausalLM.from_config(model.text_model.config).eval()
    backbone.load_state_dict(model.text_model.state_dict())
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    text_ids = torch.tensor([tokenizer("Tell me a story about a robot who learns to sing.").input_ids])
    mel_frames = 300  # a 3 s clip
    placeholders = int(model.audio_lengths(torch.tensor(mel_frames)))
    audio_ids = torch.cat([text_ids, torch.full((1, placeholders), model.config.audio_token_id)], dim=1)
    features = torch.randn(1, 80, mel_frames)
    same_length_text = torch.randint(0, 250, audio_ids.shape)

    rows = []
    with torch.no_grad():
        for name, ours, theirs in (
            ("text prompt", lambda: model.generate(input_ids=text_ids, **settings),
             lambda: backbone.generate(input_ids=text_ids, **settings)),
            ("audio prompt (3 s)", lambda: model.generate(input_ids=audio_ids, input_features=features, **settings),
             lambda: backbone.generate(input_ids=same_length_text, **settings)),
        ):
            ours_s, theirs_s = timed(ours, repeats), timed(theirs, repeats)
            rows.append((name, new_tokens / ours_s, new_tokens / theirs_s))
    return rows


def encoder_length(repeats: int) -> tuple[float, float]:
    encoder = WhisperAudioEncoder(SpeechLMAudioConfig(**WHISPER_BASE)).eval()
    clip = torch.randn(1, 80, 300)
    padded = torch.zeros(1, 80, 3000)
    padded[..., :300] = clip
    with torch.no_grad():
        return timed(lambda: encoder(clip), repeats), timed(lambda: encoder(padded), repeats)


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
    print("\n| generation | speechlm tok/s | backbone tok/s | ratio (goal >= 0.97) |\n|---|---|---|---|")
    for name, ours, theirs in generation_overhead(args.repeats, args.new_tokens):
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.3f} |")
    short, full = encoder_length(args.repeats)
    print("\n| Whisper-base encoder | seconds |\n|---|---|")
    print(f"| 3 s clip | {short:.4f} |\n| same clip padded to 30 s | {full:.4f} |")
    print(f"| ratio (goal <= 0.15) | {short / full:.3f} |")


if __name__ == "__main__":
    main()
