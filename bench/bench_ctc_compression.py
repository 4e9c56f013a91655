"""CTC compression against none, from the same CTC pre-alignment: held-out ASR WER after a few LM steps.

The quick start's recipe (`configs/smollm2-135m/stage1_align.yaml`) with only the ASR task, a fixed number
of LM steps and no time limit; `--compression none` trains the projector in the LM stage as before,
`ctc` keeps it frozen and trains the compressor (`speechlm/adapters/compression.py`). Prints the WER on
clips spread over the `heldout` split after the pre-alignment and after the LM steps.

Uses the quick start's assets (``python -m speechlm.demo assets --size full``).

    python bench/bench_ctc_compression.py --compression ctc --lm-steps 60 --lr 3e-3
    python bench/bench_ctc_compression.py --compression none --lm-steps 60 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
from speechlm.demo.build import build_demo_assets
from speechlm.demo.corpus_texts import ANSWER_SYSTEM_PROMPT
from speechlm.demo.job import corpus_rows, split_for_units, spread, units_dir
from speechlm.evaluation import EvalSettings, evaluate, read_eval_manifest
from speechlm.finetune import recipe
from speechlm.finetune.config import TrainConfig

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m" / "stage1_align.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", choices=["none", "ctc"], default="ctc")
    parser.add_argument("--lm-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ctc-steps", type=int, default=400)
    parser.add_argument("--clips", type=int, default=64, help="held-out clips spread over the split")
    parser.add_argument("--cache", help="the demo assets' cache folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further recipe override, e.g. model.mode=lora (repeatable)")
    args = parser.parse_args()
    torch.manual_seed(0)
    assets = build_demo_assets("full", args.cache, progress=print)
    corpus = corpus_rows(assets)
    manifests = split_for_units(corpus, Path(assets.cache) / "demo-data-full", 400, 40)
    out = Path(tempfile.mkdtemp(prefix="bench-ctc-"))
    overrides = [f"model.text_model={assets.text_model}", f"model.audio_encoder={assets.audio_encoder}",
                 f"data.train=[{units_dir(manifests['train-units'], Path(assets.codec))},{manifests['train-text']}]",
                 f"data.codec={assets.codec}", f"data.system_prompt={json.dumps(ANSWER_SYSTEM_PROMPT)}",
                 f"training.output_dir={out / 'model'}", "training.use_cpu=true", "data.tasks={asr: 1}",
                 f"model.projector.compression={args.compression}", f"alignment.max_steps={args.ctc_steps}",
                 "alignment.max_minutes=null", f"training.max_steps={args.lm_steps}", "training.warmup_steps=10",
                 f"training.learning_rate={args.lr}", "training.logging_steps=10", *args.set]
    config = build_dataclass(TrainConfig, apply_overrides(read_yaml(RECIPE), overrides))
    model, tokenizer = recipe.build_model(config)
    processor = recipe.build_processor(config, model, tokenizer)
    heldout = out / "asr-heldout.jsonl"
    heldout.write_text("".join(json.dumps({key: row[key] for key in ("id", "audio", "text")}) + "\n"
                               for row in corpus["heldout"]))
    items = spread(read_eval_manifest(heldout, "asr"), args.clips)
    settings = EvalSettings(batch_size=16, max_new_tokens=64)

    def wer(when: str) -> None:
        model.eval()
        totals, _ = evaluate(model, processor, "asr", items, settings, progress=False)
        model.train()
        print(f"{args.compression}: held-out WER {totals['wer']:.3f} ({len(items)} clips) {when}", flush=True)

    examples = recipe.load_training_examples(config)
    print(recipe.align(config, model, tokenizer, examples, progress=False).summary())
    wer("after the CTC pre-alignment")
    trainer = recipe.build_trainer(config, model, processor, recipe.build_datasets(config, processor, examples))
    start = time.perf_counter()
    trainer.train()
    losses = [round(log["loss"], 3) for log in trainer.state.log_history if "loss" in log]
    print(f"{args.compression}: {args.lm_steps} LM steps at lr {args.lr} in {time.perf_counter() - start:.0f} s, "
          f"loss every 10 steps {losses}")
    wer(f"after {args.lm_steps} LM steps")


if __name__ == "__main__":
    main()
