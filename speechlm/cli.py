"""``speechlm SUBCOMMAND``: each subcommand is one function whose signature is its interface.

User errors (a bad file, field or value) exit with status 2 and one line naming what is wrong;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
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


def convert_whisper_ct2(src: list[str], out: str, dtype: str) -> Path:
    """Convert a CTranslate2 (faster-whisper) Whisper model to openai-whisper's ``.pt``."""
    from speechlm.adapters.whisper_ct2 import convert_whisper_ct2 as convert

    path = convert(src[0] if len(src) == 1 else src, out, dtype=dtype)
    print(f"saved openai-whisper checkpoint to {path}")
    return path


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

    p = commands.add_parser("convert", help="convert a checkpoint of another format")
    formats = p.add_subparsers(dest="format", required=True)
    f = formats.add_parser("whisper-ct2", help="CTranslate2 (faster-whisper) Whisper -> openai-whisper .pt")
    f.add_argument("src", nargs="+", help="a CTranslate2 model directory, its model.bin, or the parts of a split "
                                          "model.bin in order")
    f.add_argument("out", help="the openai-whisper checkpoint to write (.pt)")
    f.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="weights dtype")
    f.set_defaults(run=lambda a: convert_whisper_ct2(a.src, a.out, a.dtype))
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
