"""Whether the codec's speech decoder is understood: Whisper base (the judge) transcribes what it speaks.

Sets, each an even spread of ``--items`` rows of the quick start's corpus: held-out sentences (``text``), the
out-of-domain ones, and the backbone's answers to the held-out spoken questions (``answer``: what the quick
start's model says, cut to its first two sentences, about what it writes in 64 tokens). Beside the decoder's
speech, the judge hears each sentence's original clip (the floor) and the clip's own units decoded by the codec
(its vocoder's ceiling) where there is one, and ``unit_error_rate`` compares the decoder's units with the clip's
(``--piper-floor``: also Piper's own units, the clip's text spoken again with its settings, against the clip's:
how far two readings by the same voice differ, the floor of that figure). The decoder speaks one
item at a time; ``speak_rtf`` is its seconds over the seconds of audio it speaks (the vocoder's decode not
counted), the judge runs after.

    python -m speechlm.demo assets --size full --cache /tmp/democache   # the codec and its speech decoder
    python bench/bench_speech_decoder.py --cache /tmp/democache --items 40 [--piper-floor]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechlm.demo.assets import verified
from speechlm.demo.corpus import Voice
from speechlm.demo.corpus_audio import PiperSynthesizer
from speechlm.demo.job import spread
from speechlm.evaluation import load_judge, transcribe_batch
from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.metrics import unit_errors, word_errors
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec_loading import load_codec
from speechlm.speech_io.speech_decoder import split_sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the demo cache (assets-SIZE.json)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--codec", help="a codec folder with speech-decoder/ (default: the cache's)")
    parser.add_argument("--items", type=int, default=40, help="rows of each set")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--piper-floor", action="store_true",
                        help="also speak each clip's text again with Piper (the `speak` extra's voice, the clip's "
                             "settings) and compare its units with the clip's")
    args = parser.parse_args()
    torch.set_num_threads(2)
    assets = json.loads((Path(args.cache) / f"assets-{args.size}.json").read_text())
    codec = load_codec(args.codec or assets["codec"])
    if codec.speech_decoder is None:
        raise SystemExit(f"{args.codec or assets['codec']}: no speech-decoder/; train one with speechlm "
                         f"train-speech-decoder")
    judge = load_judge(assets["audio_encoder"])
    piper = PiperSynthesizer(Voice(verified("piper_voice"), verified("piper_voice_config"))) if args.piper_floor else None
    heldout, ood = read_jsonl(Path(assets["heldout"])), read_jsonl(Path(assets["ood"]))
    root = {"heldout": Path(assets["heldout"]).parent, "ood": Path(assets["ood"]).parent}
    sets = {
        "heldout": [(r["text"], root["heldout"] / r["audio"], r) for r in spread(heldout, args.items)],
        "ood": [(r["text"], root["ood"] / r["audio"], r) for r in spread(ood, args.items)],
        "heldout_answers": [(" ".join(split_sentences(r["answer"])[:2]), None, r)
                            for r in spread([r for r in heldout if r.get("answer")], args.items)],
    }
    results = {"decoder": codec.speech_decoder.config.to_dict() | {"vocabulary": "..."}, "sets": {}}
    for name, items in sets.items():
        texts = [text for text, _, _ in items]
        start = time.perf_counter()
        spoken = [codec.speech_decoder.speak(text) for text in texts]
        speak_seconds = time.perf_counter() - start
        heard = transcribe_batch(judge, codec.decode_batch(spoken))
        row = {"items": len(items), "judge_wer": round(word_errors(texts, heard).rate, 4),
               "speak_rtf": round(speak_seconds / (sum(map(len, spoken)) / codec.frame_rate), 4),
               "seconds_of_speech": round(sum(map(len, spoken)) / codec.frame_rate, 1)}
        clips = [clip for _, clip, _ in items if clip is not None]
        if clips:  # the floor (the clip itself) and the vocoder's ceiling (the clip's own units decoded)
            waves = [load_audio(clip) for clip in clips]
            units = [clip_units(codec, wave) for wave in waves]
            row["unit_error_rate"] = round(unit_errors(units, spoken).rate, 4)
            if piper is not None:
                again = [clip_units(codec, piper(r["text"], **r["synthesis"], seed=1)) for _, _, r in items]
                row["piper_again_unit_error_rate"] = round(unit_errors(units, again).rate, 4)
            row["original_audio_judge_wer"] = round(word_errors(texts, transcribe_batch(judge, waves)).rate, 4)
            row["reference_units_judge_wer"] = round(word_errors(
                texts, transcribe_batch(judge, codec.decode_batch(codec.encode(waves)))).rate, 4)
        row["heard"] = [{"text": t, "heard": h} for t, h in zip(texts[:5], heard[:5], strict=True)]
        results["sets"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def clip_units(codec, wave) -> list[int]:
    """Layer-1 units of one waveform, as the evaluation encodes a TTS reference."""
    return codec.encode([wave], n_q=1)[0][0].tolist()


if __name__ == "__main__":
    main()
