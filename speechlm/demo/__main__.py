"""``python -m speechlm.demo assets --size ci|full [--cache DIR]``: build the quick start's assets."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from speechlm.demo.corpus import CORPUS_SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechlm.demo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("assets", help="build backbone, Whisper, corpus and codec into the cache")
    p.add_argument("--size", choices=list(CORPUS_SIZES), default="ci", help="corpus size (ci: a few dozen clips)")
    p.add_argument("--cache", help="cache folder (default: $SPEECHLM_CACHE or ~/.cache/speechlm/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (1 is much faster on a CPU shared with other jobs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from speechlm.demo.assets import DemoAssetError
    from speechlm.demo.build import build_demo_assets

    try:
        assets = build_demo_assets(args.size, args.cache, seed=args.seed)
    except (DemoAssetError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"speechlm.demo: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(assets), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
