"""Training benchmarks (run by hand; figures go to BENCHMARKS.md with this command).

    python bench/bench_train.py [--steps 8] [--batch 4] [--seq 256] [--rounds 3]

1. Throughput: tokens/s of our training step (SpeechLMTrainer + SpeechLMCollator + SpeechLMForCausalLM in
   LoRA mode) against a plain HF Trainer + peft LoRA on the same backbone, with text-only batches of the
   same token count, in the same run (rounds alternate the two; medians of per-step times).
2. Padding: the padded share of batches with length grouping vs random batching, on utterance lengths
   spread like LibriSpeech (log-normal, median 12 s, 1..30 s), as ASR (continuous) and TTS (units) samples.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

from speechlm.adapters.building import ModelSpec, build_speechlm
from speechlm.adapters.tiny import build_byte_tokenizer
from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.sampler import LengthGroupedSampler, padding_fraction
from speechlm.finetune.trainer import SpeechLMTrainer

BACKBONE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, max_position_embeddings=2048, vocab_size=32000, tie_word_embeddings=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


class TokenRows(torch.utils.data.Dataset):
    """Fixed-length random text rows: the same token count for both trainers, no padding."""

    def __init__(self, rows: int, seq: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (rows, seq), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def arguments(out: str, steps: int, batch: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
                             disable_tqdm=True, remove_unused_columns=False, seed=0)


def time_ours(backbone_dir: str, dataset, steps: int, batch: int) -> list[float]:
    model, tokenizer = build_speechlm(ModelSpec(text_model=backbone_dir, text=None, mode="lora", lora=LORA,
                                                projector={"hidden_size": 1024}))
    from speechlm.adapters.building import build_processor

    processor = build_processor(tokenizer, model.config)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        SpeechLMTrainer(model=model.train(), args=arguments(out, steps, batch), train_dataset=dataset,
                        processing_class=processor, data_collator=SpeechLMCollator.from_processor(processor),
                        length_grouping=False, callbacks=[timer]).train()
    return timer.times[2:]  # the first steps warm up allocators and kernels


def time_plain(backbone_dir: str, dataset, steps: int, batch: int) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(backbone_dir)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        Trainer(model=model.train(), args=arguments(out, steps, batch), train_dataset=dataset,
                callbacks=[timer]).train()
    return timer.times[2:]


def throughput(steps: int, batch: int, seq: int, rounds: int) -> dict[str, float]:
    tokenizer = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as backbone_dir:
        torch.manual_seed(0)
        config = LlamaConfig(**BACKBONE, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None)
        AutoModelForCausalLM.from_config(config).save_pretrained(backbone_dir)
        tokenizer.save_pretrained(backbone_dir)
        # Ids below the byte tokenizer's 259: text tokens both models embed the same way.
        dataset = TokenRows(steps * batch, seq, vocab=256)
        ours, plain = [], []
        for _ in range(rounds):
            ours += time_ours(backbone_dir, dataset, steps, batch)
            plain += time_plain(backbone_dir, dataset, steps, batch)
    tokens = batch * seq
    # Medians, and fastest steps: on a shared machine other jobs only ever add time to a step.
    result = {"steps": len(ours)}
    for name, pick in (("median", statistics.median), ("fastest", min)):
        result[name] = (tokens / pick(ours), tokens / pick(plain))
    return result


def padding(batch_sizes=(8, 16), count: int = 5000) -> list[tuple[str, int, float, float]]:
    seconds = np.clip(np.random.default_rng(0).lognormal(np.log(12.0), 0.45, count), 1.0, 30.0)
    # ASR, continuous: 10 Hz <|audio|> positions + ~4 transcript tokens a second + ~25 of template.
    # TTS, discrete: 50 Hz units + the same text.
    kinds = {"asr (continuous)": 25 + 10 * seconds + 4 * seconds, "tts (units)": 25 + 50 * seconds + 4 * seconds}
    rows = []
    for kind, lengths in kinds.items():
        lengths = lengths.astype(int).tolist()
        for batch in batch_sizes:
            shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()
            grouped = list(LengthGroupedSampler(lengths, batch, seed=0))
            rows.append((kind, batch, padding_fraction(lengths, shuffled, batch),
                         padding_fraction(lengths, grouped, batch)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("\n| padding | batch | random batching | length-grouped |\n| --- | --- | --- | --- |")
    for kind, batch, shuffled, grouped in padding():
        print(f"| {kind} | {batch} | {shuffled:.1%} | {grouped:.1%} |")
    result = throughput(args.steps, args.batch, args.seq, args.rounds)
    print(f"\n| tokens/s, LoRA r=16, {args.batch}x{args.seq} text tokens, {result['steps']} steps each | median step "
          f"| fastest step |\n| --- | --- | --- |")
    (ours_med, plain_med), (ours_min, plain_min) = result["median"], result["fastest"]
    print(f"| plain HF Trainer + peft LoRA (LlamaForCausalLM) | {plain_med:.0f} | {plain_min:.0f} |")
    print(f"| speechlm (SpeechLMTrainer, SpeechLMForCausalLM lora) | {ours_med:.0f} | {ours_min:.0f} |")
    print(f"| ratio (goal >= 0.9) | {ours_med / plain_med:.2f} | {ours_min / plain_min:.2f} |")


if __name__ == "__main__":
    main()
