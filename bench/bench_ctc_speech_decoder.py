"""Would a small non-autoregressive speech decoder learn TTS where the LM does not? A probe for issue 21.

The quick start's LM speaks by generating each 50 Hz unit with all 30 of its layers: on 2 cores it trains on
~300 tokens a second, so 15 minutes show it well under one epoch of the corpus's speech, and its answers are
heard at ~95% WER. LLaMA-Omni instead hangs a small speech decoder off the LM: the LM's hidden states of the
text, upsampled, go through a few layers that predict the units with CTC (which learns the alignment).

Here: the frozen backbone's last hidden states of each sentence (computed once), each token's state repeated
over a share of the clip's frames proportional to its characters (the clip's own unit count in training; the
characters times the corpus's units per character when speaking), a small bidirectional transformer, and CTC
against the clip's units with repeats merged. Speaking: the best path, a blank holding the unit before it, gives
one unit a frame, which the codec's vocoder decodes and Whisper base (the judge) hears. Train and judge on the
job's splits (`python -m speechlm.demo run` writes them; its codec's vocoder decodes):

    python bench/bench_ctc_speech_decoder.py --cache /tmp/democache \
        --train /tmp/democache/demo-data-full/train-units-981db9d9fb11 \
        --eval /tmp/exp/full36/eval-data/tts-heldout.jsonl /tmp/exp/full36/eval-data/tts-ood.jsonl --minutes 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechlm.evaluation import load_judge, transcribe
from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.metrics import unit_errors, word_errors
from speechlm.finetune.prepared import load_prepared
from speechlm.speech_io.codec_loading import load_codec


class CTCSpeechDecoder(nn.Module):
    """Upsampled LM states -> per-frame unit logits (index ``num_units`` is CTC's blank)."""

    def __init__(self, lm_size: int, num_units: int, width: int = 256, layers: int = 4, heads: int = 4,
                 symbols: int = 0):
        super().__init__()
        self.num_units = num_units
        # LM states (float frames) go through a projection; symbols (phonemes or characters: id frames) are embedded
        self.project = nn.Embedding(symbols, width) if symbols else nn.Linear(lm_size, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers)
        self.head = nn.Linear(width, num_units + 1)
        self.width = width

    def forward(self, frames: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(frames.shape[1], device=frames.device)[:, None]
        scale = torch.exp(torch.arange(0, self.width, 2) * (-math.log(10000.0) / self.width))
        encoding = torch.zeros(frames.shape[1], self.width)
        encoding[:, 0::2], encoding[:, 1::2] = torch.sin(positions * scale), torch.cos(positions * scale)
        hidden = self.project(frames) + encoding
        return self.head(self.blocks(hidden, src_key_padding_mask=padding))


def token_states(model, tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, list[int]]]:
    """Each text's last hidden states (T, D) and its tokens' character counts (>= 1)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):  # right-padded batches: a causal LM's real positions are unchanged
            encoded = tokenizer(texts[start: start + 32], return_tensors="pt", padding=True)
            hidden = model(**encoded, output_hidden_states=True).hidden_states[-1].float()
            for row, mask in zip(hidden, encoded.attention_mask, strict=True):
                ids = encoded.input_ids[len(out) - start][: int(mask.sum())].tolist()
                chars = [max(1, len(tokenizer.decode([i]).strip())) for i in ids]
                out.append((row[: len(ids)], chars))
    return out


def symbol_inputs(texts: list[str], kind: str, table: dict[str, int]) -> list[tuple[torch.Tensor, list[int]]]:
    """Each text as ids of its espeak phonemes (Piper's phonemizer) or its characters, one weight each; ``table``
    grows with each new symbol (id 0 is padding)."""
    if kind == "phonemes":
        from piper.phonemize_espeak import EspeakPhonemizer

        phonemizer = EspeakPhonemizer()
        sequences = [[p for sentence in phonemizer.phonemize("en-us", text) for p in [*sentence, " "]]
                     for text in texts]
    else:
        sequences = [list(text.lower()) for text in texts]
    return [(torch.tensor([table.setdefault(symbol, len(table) + 1) for symbol in sequence]), [1] * len(sequence))
            for sequence in sequences]


def upsample(states: torch.Tensor, chars: list[int], frames: int) -> torch.Tensor:
    """Token states repeated over ``frames`` in proportion to their characters (every token gets >= 1)."""
    edges = [round(frames * c / sum(chars)) for c in itertools.accumulate(chars)]
    counts = [max(1, b - a) for a, b in zip([0, *edges[:-1]], edges, strict=True)]
    return states.repeat_interleave(torch.tensor(counts), dim=0)


def merged(units: list[int]) -> list[int]:
    return [u for u, _ in itertools.groupby(units)]


def batch(items, indices):
    frames = [items[i][0] for i in indices]
    lengths = torch.tensor([f.shape[0] for f in frames])
    padded = nn.utils.rnn.pad_sequence(frames, batch_first=True)
    padding = torch.arange(padded.shape[1])[None] >= lengths[:, None]
    return padded, padding, lengths


def speak(decoder, frames: torch.Tensor) -> list[int]:
    """The best path, a blank holding the unit before it (the first unit fills any leading blanks)."""
    with torch.no_grad():
        path = decoder(frames[None], torch.zeros(1, frames.shape[0], dtype=torch.bool))[0].argmax(-1).tolist()
    blank = decoder.num_units
    first = next((u for u in path if u != blank), 0)
    units, last = [], first
    for u in path:
        last = u if u != blank else last
        units.append(last)
    return units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the demo cache (assets-SIZE.json)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--train", required=True, help="a `speechlm prepare` output with text and units")
    parser.add_argument("--eval", nargs="+", required=True, help="tts manifests: id, text, units")
    parser.add_argument("--input", choices=["lm", "phonemes", "chars"], default="lm",
                        help="what the decoder reads: the backbone's last hidden states of the text's tokens (LLaMA-Omni), "
                             "or the text's espeak phonemes or characters, embedded from scratch")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    random.seed(0)

    assets = json.loads((Path(args.cache) / f"assets-{args.size}.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(assets["text_model"], padding_side="right")
    backbone = AutoModelForCausalLM.from_pretrained(assets["text_model"]).eval()
    codec = load_codec(assets["codec"])
    start = time.perf_counter()
    train = [e for e in load_prepared(args.train) if e.text and e.units]
    table: dict[str, int] = {}

    def inputs(texts: list[str]):
        return token_states(backbone, tokenizer, texts) if args.input == "lm" else symbol_inputs(texts, args.input, table)

    states = inputs([e.text for e in train])
    rate = sum(len(e.units) for e in train) / sum(len(e.text) for e in train)
    items = [(upsample(s, c, len(e.units)), torch.tensor(merged(list(e.units)))) for (s, c), e in zip(states, train, strict=True)]
    print(f"{len(items)} training clips, inputs ({args.input}) in {time.perf_counter() - start:.0f} s, "
          f"{rate:.2f} units a character", flush=True)

    decoder = CTCSpeechDecoder(backbone.config.hidden_size, codec.codebook_size, args.width, args.layers,
                               symbols=0 if args.input == "lm" else 512)  # room for symbols first seen in evaluation
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.01)
    ctc = nn.CTCLoss(blank=codec.codebook_size, zero_infinity=True)
    budget, begin, step, curve = args.minutes * 60, time.perf_counter(), 0, []
    order = sorted(range(len(items)), key=lambda i: items[i][0].shape[0])  # batches of similar length
    batches = [order[i: i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    decoder.train()
    while time.perf_counter() - begin < budget:
        random.shuffle(batches)
        for indices in batches:
            elapsed = time.perf_counter() - begin
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:  # warm-up, then cosine by minutes
                group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            frames, padding, lengths = batch(items, indices)
            targets = [items[i][1] for i in indices]
            log_probs = decoder(frames, padding).log_softmax(-1).transpose(0, 1)
            loss = ctc(log_probs, torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 50 == 0:
                curve.append({"minutes": round(elapsed / 60, 2), "step": step, "loss": round(loss.item(), 3)})
                print(curve[-1], flush=True)
    decoder.eval()
    results = {"train_clips": len(items), "steps": step, "minutes": args.minutes, "curve": curve,
               "settings": vars(args), "sets": {}}
    judge = load_judge(assets["audio_encoder"])
    for manifest in args.eval:
        rows = read_jsonl(Path(manifest))
        spoken = [speak(decoder, upsample(s, c, max(1, round(len(r["text"]) * rate))))
                  for (s, c), r in zip(inputs([r["text"] for r in rows]), rows, strict=True)]
        waves = codec.decode_batch(spoken)
        heard = [transcribe(judge, wave) for wave in waves]
        texts = [r["text"] for r in rows]
        results["sets"][Path(manifest).stem] = {
            "items": len(rows),
            "unit_error_rate": round(unit_errors([r["units"] for r in rows], spoken).rate, 4),
            "judge_wer": round(word_errors(texts, heard).rate, 4),
            "heard": [{"text": t, "heard": h} for t, h in zip(texts[:6], heard[:6], strict=True)]}
        print(Path(manifest).stem, json.dumps(results["sets"][Path(manifest).stem], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
