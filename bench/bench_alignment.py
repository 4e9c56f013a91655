"""How fast a projector aligns Whisper base to frozen SmolLM2-135M-Instruct: held-out ASR loss by step.

Uses the quick start's assets (``python -m speechlm.demo assets --size full``). The frozen encoder's
outputs are computed once per clip (un-padded, as the model runs it, or padded to 30 s as openai-whisper
does, then cut to the clip) and fed through a stand-in tower, so only the projector and the LM run per step.

    python bench/bench_alignment.py --projector swiglu --lr 3e-3
    python bench/bench_alignment.py --projector mlp --lr 1e-3 --padded
    python bench/bench_alignment.py --projector swiglu --lr 1e-3 --ctc-steps 400   # CTC pre-alignment first
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.adapters.building import ModelSpec
from speechlm.demo.build import load_demo_assets
from speechlm.demo.job import spread
from speechlm.finetune.config import DataConfig, TrainConfig
from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.recipe import build_model, build_processor
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.features import log_mel_features


def rows_of(manifest: str, count: int) -> list[dict]:
    """``count`` spoken rows spread evenly through the manifest (it lists its sources one after another; a job
    leaves some training texts unspoken)."""
    path = Path(manifest)
    rows = spread([row for row in read_jsonl(path) if row.get("audio")], count)
    for row in rows:
        row["array"] = load_audio(path.parent / row["audio"])
    return rows


def encoder_outputs(model, rows: list[dict], padded: bool, checkpoint: str) -> dict[str, torch.Tensor]:
    whisper_model = None
    if padded:
        import whisper

        whisper_model = whisper.load_model(checkpoint, device="cpu")
    outputs = {}
    for row in rows:
        features = log_mel_features([row["array"]], n_mels=80)
        frames = int(features.input_features_mask.sum())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            if padded:
                import whisper

                mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.tensor(row["array"])))
                out = whisper_model.encoder(mel.unsqueeze(0))[0, : (frames + 1) // 2]
            else:
                out = model.audio_tower(features.input_features[:, :, :frames], torch.tensor([frames]))[0]
        outputs[row["id"]] = out.float()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projector", choices=["mlp", "swiglu"], default="swiglu")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25, help="held-out loss every this many steps")
    parser.add_argument("--train-clips", type=int, default=400)
    parser.add_argument("--heldout-clips", type=int, default=40)
    parser.add_argument("--padded", action="store_true", help="encoder on 30 s padded input, cut to the clip")
    parser.add_argument("--ctc-steps", type=int, default=0,
                        help="CTC pre-alignment steps (finetune/alignment.py) on every training clip first")
    parser.add_argument("--cache", help="the demo assets' cache folder")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    args = parser.parse_args()
    torch.manual_seed(0)
    assets = load_demo_assets(args.size, args.cache)
    config = TrainConfig(model=ModelSpec(text_model=assets.text_model, audio_encoder=assets.audio_encoder,
                                         projector={"projector_type": args.projector, "stack_factor": 5,
                                                    "hidden_size": 1024}),
                         data=DataConfig(train=[assets.train], system_prompt=""))
    model, tokenizer = build_model(config)
    processor = build_processor(config, model, tokenizer)
    if args.ctc_steps:
        from speechlm.finetune.alignment import align_projector
        from speechlm.finetune.config import AlignmentConfig
        from speechlm.finetune.examples import read_manifest

        result = align_projector(model, tokenizer, read_manifest(assets.train), AlignmentConfig(max_steps=args.ctc_steps),
                                 bf16=True)
        print(f"{result.summary()} (encoding included)")
    train, heldout = rows_of(assets.train, args.train_clips), rows_of(assets.heldout, args.heldout_clips)
    start = time.perf_counter()
    cached = encoder_outputs(model, train + heldout, args.padded, assets.audio_encoder)
    print(f"encoder outputs of {len(cached)} clips: {time.perf_counter() - start:.1f} s")

    current: list[torch.Tensor] = []

    def cached_tower(features, mel_lengths):  # the batch's cached outputs, padded to its longest
        width = max(frames.shape[0] for frames in current)
        return torch.stack([torch.nn.functional.pad(frames, (0, 0, 0, width - frames.shape[0])) for frames in current])

    model.audio_tower.forward = cached_tower

    def batch(rows):
        current[:] = [cached[row["id"]] for row in rows]
        return processor([[{"role": "user", "content": [
            {"type": "audio", "audio": {"array": row["array"], "sampling_rate": 16000}},
            {"type": "text", "text": "Transcribe the audio."}]}, {"role": "assistant", "content": row["text"]}]
            for row in rows], return_labels=True)

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = [model(**batch(heldout[i:i + 8])).loss.item() for i in range(0, len(heldout), 8)]
        model.train()
        return float(np.mean(losses))

    print(f"step 0: held-out loss {heldout_loss():.3f}", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng = random.Random(0)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch(rng.sample(train, 8))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % args.every == 0:
            print(f"step {step}: train loss {np.mean(losses):.3f}, held-out loss {heldout_loss():.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            losses = []


if __name__ == "__main__":
    main()
