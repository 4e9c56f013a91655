"""Transcriptions checked against the reader's transcript in one pass (`speechlm.drafting`) against decoding
step by step, on a quick-start job's trained model and ASR sets, every clip's reading loaded from the job's
readings file (so only the LM's part is timed). Rows are run drafted, step by step, drafted again (the two
drafted runs show the machine's spread); each split reports seconds, WER, how many drafts were kept and
whether every transcription is the same.

    python bench/bench_drafting.py --job /tmp/exp/np87/demo --readings /tmp/democache87/readings-full.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import speechlm.responding as responding
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.demo.job import JobSettings, load_trained
from speechlm.evaluation import evaluate, read_eval_manifest


def timed_runs(model, processor, items, settings) -> dict:
    drafted, checked = responding.drafts_apply, responding.accepted_drafts
    kept = [0, 0]

    def counting(*args):
        result = checked(*args)
        kept[0], kept[1] = kept[0] + sum(result), kept[1] + len(result)
        return result

    rows = {}
    try:
        responding.accepted_drafts = counting
        for name, applies in (("drafted", drafted), ("step by step", lambda *args: False), ("drafted again", drafted)):
            responding.drafts_apply = applies
            kept[:] = [0, 0]
            start = time.perf_counter()
            totals, results = evaluate(model, processor, "asr", items, settings, progress=False)
            rows[name] = {"seconds": round(time.perf_counter() - start, 1), "wer": totals["wer"],
                          "drafts_kept": kept[0], "drafts": kept[1], "hypotheses": [r["hypothesis"] for r in results]}
    finally:
        responding.drafts_apply, responding.accepted_drafts = drafted, checked
    same = sum(a == b for a, b in zip(rows["drafted"]["hypotheses"], rows["step by step"]["hypotheses"], strict=True))
    for row in rows.values():
        del row["hypotheses"]
    return {**rows, "same_transcriptions": same, "items": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a quick-start job's --out folder (model/ and eval-data/)")
    parser.add_argument("--readings", help="the job's readings file (the cache's readings-SIZE.safetensors)")
    parser.add_argument("--splits", default="heldout,ood")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args()
    job = Path(args.job)
    model, processor = load_trained(job / "model")
    model.reading_cache = ReadingCache()
    if args.readings:
        print(f"{model.reading_cache.load(args.readings)} readings loaded")
    settings = JobSettings().eval_settings("asr")  # as the job evaluates ASR
    figures = {}
    for split in args.splits.split(","):
        items = read_eval_manifest(job / "eval-data" / f"asr-{split}.jsonl", "asr")
        figures[split] = timed_runs(model, processor, items, settings)
        print(split, json.dumps(figures[split]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
