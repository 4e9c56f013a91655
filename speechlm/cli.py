"""``speechlm SUBCOMMAND``: each subcommand is one function whose signature is its interface.

User errors (a bad file, field or value) exit with status 2 and one line naming what is wrong;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USER_ERRORS = (ValueError, OSError, KeyError)


def init(config: str, out: str, overrides: list[str]) -> Path:
    """Build a SpeechLM from a model YAML and save it with its processor (tokenizer + audio settings)."""
    from speechlm.adapters.building import ModelSpec, build_processor, build_speechlm
    from speechlm.configfile import apply_overrides, build_dataclass, read_yaml

    spec = build_dataclass(ModelSpec, apply_overrides(read_yaml(config), overrides), where="")
    model, tokenizer = build_speechlm(spec)
    out_dir = Path(out)
    model.save_pretrained(out_dir)
    build_processor(tokenizer, model.config).save_pretrained(out_dir)
    print(f"{model.parameter_counts()}\nsaved to {out_dir}")
    return out_dir


def generate(model: str, audio: str | None, text: str | None, output: str, max_new_tokens: int) -> str:
    """One response to audio and/or text, streamed to the terminal as it is generated."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, TextStreamer

    import speechlm  # noqa: F401  (registers the Auto classes)

    if audio is None and text is None:
        raise ValueError("give --audio FILE and/or --text STR")
    processor = AutoProcessor.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    inputs = processor(text=text, audio=audio)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        generated = lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer)
    print()
    return processor.parse_response(generated[0, inputs["input_ids"].shape[1]:]).text


def prepare(manifest: str, codec: str, out: str, layers: str, batch_size: int, chunk_size: int,
            max_bad_fraction: float) -> object:
    """Check every audio file of a manifest (or dataset) and extract its codec units into ``out``."""
    from speechlm.finetune.prepare import prepare as run_prepare

    report = run_prepare(manifest, codec, out, layers=layers, batch_size=batch_size, chunk_size=chunk_size,
                         max_bad_fraction=max_bad_fraction)
    if report.bad:
        print(f"{len(report.bad)} bad examples skipped, listed with reasons in {Path(out) / 'report.json'}")
    print(f"{report.prepared} of {report.total} examples prepared in {out}")
    return report


def train(config: str, overrides: list[str]) -> Path:
    """Run a training recipe (YAML + ``key.sub=value`` overrides); plain, or under accelerate/torchrun/deepspeed."""
    from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
    from speechlm.finetune.config import TrainConfig
    from speechlm.finetune.recipe import run

    settings = build_dataclass(TrainConfig, apply_overrides(read_yaml(config), overrides), where="")
    out_dir = run(settings)
    print(f"saved to {out_dir}")
    _leave_process_group()
    return out_dir


def _leave_process_group() -> None:
    """End a multi-process worker cleanly: 2-process gloo jobs otherwise abort at interpreter exit now
    and then ("terminate called without an active exception") after finishing their work."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechlm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("init", help="build a SpeechLM from a model YAML and save it")
    p.add_argument("config", help="model YAML (component paths, or tiny random dims)")
    p.add_argument("--out", required=True, help="directory to save the model and its tokenizer to")
    p.set_defaults(run=lambda a: init(a.config, a.out, a.overrides), takes_overrides=True)

    p = commands.add_parser("generate", help="one response to audio and/or text")
    p.add_argument("--model", required=True, help="a saved SpeechLM directory or Hub id")
    p.add_argument("--audio", help="an audio file (wav, flac, ogg, opus, mp3)")
    p.add_argument("--text", help="a text prompt (with --audio: the instruction about it)")
    p.add_argument("--output", choices=["text"], default="text", help="what to respond with")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(run=lambda a: generate(a.model, a.audio, a.text, a.output, a.max_new_tokens))

    p = commands.add_parser("prepare", help="check audio and extract codec units for training")
    p.add_argument("manifest", help="JSONL manifest, saved dataset directory, or audiofolder directory")
    p.add_argument("--codec", required=True, help="SpeechTokenizer directory (config.json + .pt)")
    p.add_argument("--out", required=True, help="output directory; a re-run resumes there")
    p.add_argument("--layers", choices=["1", "all"], default="1", help="RVQ layers to keep (1: semantic)")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded together")
    p.add_argument("--chunk-size", type=int, default=256, help="examples per shard (the unit of resumption)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="fail if more examples than this are bad")
    p.set_defaults(run=lambda a: prepare(a.manifest, a.codec, a.out, a.layers, a.batch_size, a.chunk_size,
                                         a.max_bad_fraction))

    p = commands.add_parser("train", help="run a training recipe (YAML + key.sub=value overrides)")
    p.add_argument("config", help="training recipe YAML, e.g. configs/tiny/train.yaml")
    p.set_defaults(run=lambda a: train(a.config, a.overrides), takes_overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key.sub=value overrides may stand anywhere after the subcommand; argparse leaves them over.
    args, leftover = parser.parse_known_args(argv)
    args.overrides = [item for item in leftover if "=" in item and not item.startswith("-")]
    unknown = [item for item in leftover if item not in args.overrides]
    if unknown or (args.overrides and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or args.overrides)}")
    try:
        args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"speechlm {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
