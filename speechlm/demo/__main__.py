"""The quick start from the command line.

    python -m speechlm.demo assets --size ci|full|full-words [--cache DIR]   build the assets only
    python -m speechlm.demo run --size full --out out/demo          the main job (assets, training, report)
    python -m speechlm.demo ship-codec --cache DIR                  (maintainers) data/codec/ from DIR's trained codec
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from speechlm.demo.corpus import CORPUS_SIZES
from speechlm.demo.job import JobSettings, run_job


def main(argv: list[str] | None = None) -> int:
    job = JobSettings(recipe="")  # its defaults are the command line's
    parser = argparse.ArgumentParser(prog="python -m speechlm.demo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    assets = commands.add_parser("assets", help="build backbone, Whisper, corpus and codec into the cache")
    run = commands.add_parser("run", help="the main job: assets, stage-1 training, evaluation before and after, "
                                          "report")
    for p in (assets, run):
        p.add_argument("--size", choices=list(CORPUS_SIZES), default="ci" if p is assets else job.size,
                       help="corpus size (ci: a few dozen clips)")
        p.add_argument("--cache", help="cache folder (default: $SPEECHLM_CACHE or ~/.cache/speechlm/demo)")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
        p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        p.add_argument("--train-codec", action="store_true",
                       help="train the codec's vocoder and speech decoder on the corpus (25 minutes for full), not "
                            "the ones the package ships for it")
    assets.add_argument("--seed", type=int, default=0)
    run.add_argument("--recipe", help="training recipe YAML (default: configs/smollm2-135m/stage1_align.yaml "
                                      "here, else in the source tree)")
    run.add_argument("--out", default=job.out, help="report, plot, wav and the trained model go here")
    run.add_argument("--max-minutes", type=float, default=job.max_minutes,
                     help="stop training after this many minutes (default: the recipe's training.max_minutes)")
    run.add_argument("--curve-every", type=float, default=job.curve_every_minutes,
                     help="minutes of training between curve points")
    run.add_argument("--curve-items", type=int, default=job.curve_items, help="held-out clips per learning-curve point")
    run.add_argument("--tts-items", type=int, default=job.tts_items,
                     help="clips of each held-out split the tts evaluation speaks")
    run.add_argument("--tts-train-clips", type=int, default=job.tts_train_clips,
                     help="training clips whose units are extracted for the tts task")
    run.add_argument("--spoken-train-clips", type=int, default=job.spoken_train_clips,
                     help="training clips Piper speaks (default: the recipe's data.num_samples; all where the codec "
                          "trains here)")
    run.add_argument("--no-untrained-eval", dest="evaluate_untrained", action="store_false",
                     help="skip the evaluation before training (variants of a recipe compared after training)")
    run.add_argument("--read-again", dest="keep_readings", action="store_false",
                     help="read every clip with the frozen encoder and reader again, not from the cache's readings file")
    ship = commands.add_parser("ship-codec", help="(maintainers) the package's shipped codec, from the codec a cache "
                                                  "built with --train-codec")
    ship.add_argument("--size", choices=list(CORPUS_SIZES), default="full")
    ship.add_argument("--cache", help="cache folder (default: $SPEECHLM_CACHE or ~/.cache/speechlm/demo)")
    ship.add_argument("--out", help="where to write it (default: the package's data/codec/)")
    ship.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    ship.set_defaults(threads=None)
    run.add_argument("overrides", nargs="*", help="recipe overrides, key.sub=value (e.g. training.max_steps=50)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from speechlm.configfile import ConfigFileError
    from speechlm.demo.assets import DemoAssetError
    from speechlm.finetune.prepare import PrepareError

    try:
        if args.command == "ship-codec":
            from speechlm.demo.build import load_demo_assets, speech_decoder_manifests
            from speechlm.demo.shipped_codec import SHIPPED_CODEC, ship_codec

            built = load_demo_assets(args.size, args.cache)
            print(ship_codec(built.codec, args.out or SHIPPED_CODEC, heard=speech_decoder_manifests(built.corpus)))
        elif args.command == "assets":
            from speechlm.demo.build import build_demo_assets

            built = build_demo_assets(args.size, args.cache, seed=args.seed, train_codec=args.train_codec)
            print(json.dumps(asdict(built), indent=2))
        else:
            recipe = {"recipe": args.recipe} if args.recipe else {}
            run_job(JobSettings(**recipe, out=args.out, size=args.size, cache=args.cache,
                                overrides=args.overrides, max_minutes=args.max_minutes,
                                curve_every_minutes=args.curve_every, curve_items=args.curve_items,
                                tts_items=args.tts_items, tts_train_clips=args.tts_train_clips,
                                evaluate_untrained=args.evaluate_untrained, keep_readings=args.keep_readings,
                                train_codec=args.train_codec, spoken_train_clips=args.spoken_train_clips))
    except (DemoAssetError, ConfigFileError, PrepareError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"speechlm.demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
