"""Whether RVQ completion learns a SpeechTokenizer's layers 2..n_q from layer 1 and a voice prompt: code accuracy
per layer on held-out clips, against two baselines drawn from the same training codes.

No published SpeechTokenizer installs offline, so the codec is one built from the default config (random weights,
seeded) with its codebooks filled by k-means of the corpus's latents (``--codec`` takes any saved one instead). Its
decoder is untrained, so nothing here is listened to: the figures say whether the model learns what the codes of
layers 2..n_q owe to layer 1 and to the voice, on this codec.

Each held-out clip is its own prompt and target, as training cuts them: its first min(3 s, a third) is the prompt,
the rest the target, whose true layer 1 is completed. Baselines: each layer's most frequent code (unigram), and the
most frequent code of each layer given the frame's layer-1 code (a table over the training codes).

    python -m speechlm.demo assets --size full --cache /tmp/democache
    python bench/bench_completion.py --cache /tmp/democache --minutes 8 --clips 800 --codec-out /tmp/exp/st-random
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechlm.finetune.completion_training import (
    CompletionTraining,
    completion_config,
    completion_examples,
    train_completion,
)
from speechlm.finetune.vocoder_training import manifest_clips
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec


def random_codec(train_manifest: Path, clips: int, out: Path | None) -> SpeechTokenizerCodec:
    """SpeechTokenizer's default config, random weights (seed 0), codebooks filled from ``clips`` training clips."""
    if out is not None and (out / "config.json").is_file():
        return SpeechTokenizerCodec.from_pretrained(out)
    codec = SpeechTokenizerCodec.from_config(CodecConfig(), seed=0)
    codec.fill_codebooks([load_audio(clip) for clip in manifest_clips([train_manifest], clips)], seed=0)
    if out is not None:
        codec.save_pretrained(out)
    return codec


def table_baselines(examples: list[torch.Tensor], codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the most frequent code ``(L,)``, and the most frequent code given the layer-1 code ``(L, C)``."""
    codes = torch.cat(examples, dim=1)  # L, N
    layers = codes.shape[0]
    unigram = torch.stack([torch.bincount(codes[layer], minlength=codebook_size).argmax() for layer in range(layers)])
    given = torch.zeros(layers, codebook_size, codebook_size, dtype=torch.long)
    for layer in range(layers):
        given[layer].index_put_((codes[0], codes[layer]), torch.ones_like(codes[0]), accumulate=True)
    by_first = given.argmax(dim=2)
    unseen = given.sum(dim=2) == 0  # layer-1 codes never heard in training: the unigram
    by_first[unseen] = unigram[:, None].expand_as(by_first)[unseen]
    return unigram, by_first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the demo cache (assets-SIZE.json)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--codec", help="a saved SpeechTokenizer codec folder (default: a random one, built here)")
    parser.add_argument("--codec-out", help="where to keep the random codec (reused when it is there)")
    parser.add_argument("--fill-clips", type=int, default=200, help="training clips the random codebooks come from")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--clips", type=int, default=800, help="training clips (an even spread)")
    parser.add_argument("--heldout", type=int, default=60, help="held-out clips measured (an even spread)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    assets = json.loads((Path(args.cache) / f"assets-{args.size}.json").read_text())

    start = time.perf_counter()
    codec = SpeechTokenizerCodec.from_pretrained(args.codec) if args.codec else \
        random_codec(Path(assets["train"]), args.fill_clips, Path(args.codec_out) if args.codec_out else None)
    train = completion_examples(codec, [assets["train"]], codec.n_q, args.clips)
    heldout = completion_examples(codec, [assets["heldout"]], codec.n_q, args.heldout)
    prepare_seconds = time.perf_counter() - start
    unigram, by_first = table_baselines(train, codec.codebook_size)
    settings = CompletionTraining(max_minutes=args.minutes, max_clips=args.clips)
    model, report = train_completion(train, completion_config(codec), settings,
                                     codebooks=codec.codebook_vectors(codec.n_q))

    hits = {name: torch.zeros(codec.n_q) for name in ("completion", "unigram", "given_layer_1")}
    frames = 0
    for codes in heldout:
        cut = min(settings.prompt_frames, codes.shape[1] // 3)
        prompt, target = codes[:, :cut], codes[:, cut:]
        guesses = {"completion": model.complete(target[0], prompt),
                   "unigram": unigram[:, None].expand_as(target),
                   "given_layer_1": by_first[torch.arange(codec.n_q)[:, None], target[0][None]]}
        for name, guess in guesses.items():
            hits[name] += (guess == target).sum(dim=1).float()
        frames += target.shape[1]
    accuracy = {name: [round(float(v) / frames, 4) for v in hit[1:]] for name, hit in hits.items()}
    results = {"codec": args.codec or "random SpeechTokenizer (default config, seed 0)", "layers": codec.n_q,
               "training": report.summary(), "train_clips": len(train), "heldout_clips": len(heldout),
               "heldout_frames": frames, "prepare_seconds": round(prepare_seconds, 1),
               "accuracy_by_layer_2_on": accuracy,
               "mean_accuracy": {name: round(sum(v) / len(v), 4) for name, v in accuracy.items()}}
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
