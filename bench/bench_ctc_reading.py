"""Does the frozen LM read CTC-compressed speech? Pre-align the projector with CTC (finetune/alignment.py),
keep only the frames CTC does not call blank (one per token: repeats dropped), turn each into the
probability-weighted mix of the LM's token embeddings, and feed those to the untouched SmolLM2 in place of
the audio. No LM-stage training at all: the ASR WER of the CTC text itself, of the LM's answer to
"Transcribe the audio.", and spoken-QA accuracy beside the same questions as text.

Uses the quick start's assets (``python -m speechlm.demo assets --size full``).

    python bench/bench_ctc_reading.py --ctc-steps 400 --clips 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from speechlm.adapters.building import ModelSpec
from speechlm.demo.build import load_demo_assets
from speechlm.demo.job import spread
from speechlm.finetune.alignment import ProjectorAligner, transcribed
from speechlm.finetune.config import AlignmentConfig, DataConfig, TrainConfig
from speechlm.finetune.examples import read_jsonl, read_manifest
from speechlm.finetune.metrics import match_answer, word_errors
from speechlm.finetune.recipe import build_model, build_processor
from speechlm.speech_io.constants import MEL_HOP_LENGTH, SAMPLE_RATE, stacked_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctc-steps", type=int, default=400)
    parser.add_argument("--clips", type=int, default=64, help="ASR clips spread over each held-out split")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--cache", help="the demo assets' cache folder")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    args = parser.parse_args()
    torch.manual_seed(0)
    assets = load_demo_assets(args.size, args.cache)
    config = TrainConfig(model=ModelSpec(text_model=assets.text_model, audio_encoder=assets.audio_encoder,
                                         projector={"projector_type": "swiglu", "stack_factor": 5, "hidden_size": 1024}),
                         data=DataConfig(train=[assets.train], system_prompt=""))
    model, tokenizer = build_model(config)
    processor = build_processor(config, model, tokenizer)
    aligner = ProjectorAligner(model, tokenizer, AlignmentConfig(max_steps=args.ctc_steps), n_mels=80,
                               max_audio_seconds=30.0, bf16=True)
    steps, losses, vocabulary = aligner.train(aligner.encode(transcribed(read_manifest(assets.train))))
    print(f"CTC: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {vocabulary} transcript tokens")
    model.eval()
    embeddings = model.get_input_embeddings().weight.detach()[aligner.vocabulary]
    stack = aligner.stack_factor
    # 16 kHz samples per <|audio|> position: 10 ms mel hop, encoder stride 2, then `stack` frames stacked
    samples_per_position = MEL_HOP_LENGTH * 2 * stack
    kept: list[torch.Tensor] = []
    model.get_audio_features = lambda *_, **__: torch.cat(kept)  # the compressed clip replaces the audio

    def compressed(frames: torch.Tensor) -> tuple[torch.Tensor, str]:
        with torch.no_grad():
            projected = model.multi_modal_projector(frames.float()[None])[0, : stacked_frames(frames.shape[0], stack)]
            logits = torch.cat([projected @ aligner.blank[:, None], projected @ embeddings.T], -1) / aligner.scale
            best = logits.argmax(-1)
            keep = (best != 0) & torch.cat([torch.tensor([True]), best[1:] != best[:-1]])
            mixed = logits[keep, 1:].softmax(-1) @ embeddings
        return mixed, tokenizer.decode(aligner.vocabulary[best[keep] - 1].tolist())

    def answer(frames: torch.Tensor, prompt: str | None) -> tuple[str, str]:
        mixed, text = compressed(frames)
        if not len(mixed):
            return text, ""
        kept[:] = [mixed]
        # a silent clip of the length that gets exactly len(mixed) placeholders
        content = [{"type": "audio", "audio": {"array": np.zeros(len(mixed) * samples_per_position, dtype=np.float32),
                                               "sampling_rate": SAMPLE_RATE}}]
        content += [{"type": "text", "text": prompt}] if prompt else []
        inputs = processor([[{"role": "user", "content": content}]], add_generation_prompt=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return text, tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def text_answer(question: str) -> str:
        inputs = processor([[{"role": "user", "content": question}]], add_generation_prompt=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    for split, manifest in (("heldout", assets.heldout), ("ood", assets.ood)):
        examples = read_manifest(manifest)
        chosen = [(example, clip) for example in spread(examples, args.clips) for clip in aligner.encode([example])]
        results = [answer(clip.frames, "Transcribe the audio.") for _, clip in chosen]
        references = [example.text for example, _ in chosen]
        first_lines = [lm.strip().split("\n")[0] for _, lm in results]
        print(f"{split}: {len(chosen)} clips: WER of the CTC text {word_errors(references, [r[0] for r in results]).rate:.3f}, "
              f"of the LM's answer {word_errors(references, [r[1] for r in results]).rate:.3f}, "
              f"of its first line {word_errors(references, first_lines).rate:.3f}")
        expected = _expected(manifest)
        questions = [(example, clip) for example in examples if example.id in expected
                     for clip in aligner.encode([example])]
        spoken = [answer(clip.frames, None)[1] for _, clip in questions]
        written = [text_answer(example.text) for example, _ in questions]
        speech = sum(match_answer(a, expected[e.id]).contains for a, (e, _) in zip(spoken, questions, strict=True))
        text = sum(match_answer(a, expected[e.id]).contains for a, (e, _) in zip(written, questions, strict=True))
        print(f"{split}: spoken QA {speech}/{len(questions)}, the same questions as text {text}/{len(questions)}")


def _expected(manifest: str) -> dict[str, list[str]]:
    return {row["id"]: row["expected"] for row in read_jsonl(manifest) if row.get("expected")}


if __name__ == "__main__":
    main()
