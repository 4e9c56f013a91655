"""What a training step of the quick start's model costs, and what each saving buys (run by hand).

    python bench/bench_step.py [--rounds 3] [--modes]

One batch of 8 median-length ASR samples of the quick-start corpus through SmolLM2-135M-Instruct + Whisper
base + projector, forward and backward, timed (best of ``--rounds``) in four settings, each adding one
change to the previous: the loss over full logits with SmolLM2's default system turn (the baseline); the
head only at labelled positions (training mode); an empty system turn (``data.system_prompt: ""``);
bfloat16 autocast (``training.bf16``). Ratios are against the baseline of the same run.

``--modes`` times the last setting instead with the backbone frozen (the baseline), with peft LoRA (r 16,
all linear layers) at dropout 0.05 and 0, and gated to speech (``lora.scope: speech``; the batch is all
ASR, so LoRA acts everywhere and the gate's cost is what shows).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from speechlm.adapters.building import ModelSpec
from speechlm.demo.build import load_demo_assets
from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.config import DataConfig, TrainConfig
from speechlm.finetune.recipe import build_datasets, build_model, build_processor


def median_batch(assets, system_prompt: str | None, mode: str = "frozen", lora: dict | None = None):
    config = TrainConfig(model=ModelSpec(text_model=assets.text_model, audio_encoder=assets.audio_encoder,
                                         projector={"projector_type": "swiglu", "stack_factor": 5,
                                                    "hidden_size": 1024}, mode=mode, lora=lora or {}),
                         data=DataConfig(train=[assets.train], tasks={"asr": 1}, system_prompt=system_prompt))
    model, tokenizer = build_model(config)
    processor = build_processor(config, model, tokenizer)
    dataset = build_datasets(config, processor)
    order = np.argsort(dataset.lengths)
    middle = len(order) // 2
    batch = SpeechLMCollator.from_processor(processor)([dataset[int(i)] for i in order[middle:middle + 8]])
    return model, batch


def step_seconds(model, batch, *, training: bool, autocast: bool, rounds: int) -> float:
    model.train(training)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", help="the demo assets' cache folder")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--modes", action="store_true", help="time backbone training modes instead")
    args = parser.parse_args()
    assets = load_demo_assets(args.size, args.cache)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.modes:
        time_modes(assets, args.rounds)
        return
    model, default_batch = median_batch(assets, None)
    _, short_batch = median_batch(assets, "")
    settings = [("full logits, default system turn", default_batch, False, False),
                ("+ head at labelled positions only", default_batch, True, False),
                ("+ empty system turn", short_batch, True, False),
                ("+ bf16 autocast", short_batch, True, True)]
    baseline = None
    print("| setting | tokens | s/step | vs baseline |\n| --- | --- | --- | --- |")
    for name, batch, training, autocast in settings:
        seconds = step_seconds(model, batch, training=training, autocast=autocast, rounds=args.rounds)
        baseline = baseline or seconds
        print(f"| {name} | {tuple(batch['input_ids'].shape)} | {seconds:.3f} | {seconds / baseline:.2f} |")



def time_modes(assets, rounds: int) -> None:
    modes = [("frozen backbone", "frozen", {}),
             ("LoRA r 16, all linear, dropout 0.05", "lora", {"dropout": 0.05}),
             ("LoRA, dropout 0", "lora", {"dropout": 0.0}),
             ("LoRA, dropout 0, scope speech", "lora", {"dropout": 0.0, "scope": "speech"})]
    baseline = None
    print("| backbone | s/step | vs frozen |\n| --- | --- | --- |")
    for name, mode, lora in modes:
        torch.manual_seed(0)
        model, batch = median_batch(assets, "", mode, lora)
        seconds = step_seconds(model, batch, training=True, autocast=True, rounds=rounds)
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.3f} | {seconds / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
