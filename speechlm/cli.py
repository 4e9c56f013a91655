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
    from speechlm.adapters.building import ModelSpec, build_codec, build_processor, build_speechlm
    from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
    from speechlm.speech_io.processor import CODEC_FOLDER

    spec = build_dataclass(ModelSpec, apply_overrides(read_yaml(config), overrides), where="")
    model, tokenizer = build_speechlm(spec)
    codec = build_codec(spec)
    out_dir = Path(out)
    model.save_pretrained(out_dir)
    # The processor writes the codec into OUT/codec and names it relative to OUT, so OUT can move.
    processor = build_processor(tokenizer, model.config, codec=codec,
                                codec_name_or_path=CODEC_FOLDER if codec is not None else None)
    processor.save_pretrained(out_dir)
    print(f"{model.parameter_counts()}\nsaved to {out_dir}")
    return out_dir


def generate(model: str, audio: str | None, text: str | None, output: str, out_audio: str | None,
             max_new_tokens: int, max_speech_units: int, generate_kwargs: dict, voice: str | None = None) -> str:
    """One response to audio and/or text: its text streamed to the terminal as it is generated, its speech
    (``--output speech`` / ``text+speech``) written to ``out_audio`` as a 16 kHz wav, in the voice of the
    recording ``voice`` where given (the codec's completion model)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoProcessor

    import speechlm  # noqa: F401  (registers the Auto classes)
    from speechlm.responding import AudioChunk, TextDelta, stream_response
    from speechlm.speech_io.audio import save_wav
    from speechlm.speech_io.constants import SAMPLE_RATE

    if audio is None and text is None:
        raise ValueError("give --audio FILE and/or --text STR")
    if output != "text" and out_audio is None:
        raise ValueError(f"--output {output} speaks: give --out-audio FILE.wav to write the speech to")
    if output == "text" and (out_audio is not None or voice is not None):
        raise ValueError(f"{'--out-audio' if out_audio is not None else '--voice'} needs --output speech or "
                         f"text+speech")
    check_model_source(model)
    processor = AutoProcessor.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    pieces, chunks = [], []
    for event in stream_response(lm, processor, audio=audio, text=text, output=output, max_new_tokens=max_new_tokens,
                                 max_speech_units=max_speech_units, voice=voice, **generate_kwargs):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
            print(event.text, end="", flush=True)
        elif isinstance(event, AudioChunk):
            chunks.append(event.array)
    print()
    if out_audio is not None:
        speech = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        if speech.size == 0:
            raise ValueError(f"the model produced no speech, so {out_audio} was not written")
        save_wav(out_audio, speech)
        print(f"wrote {speech.size / SAMPLE_RATE:.2f} s of speech to {out_audio}", file=sys.stderr)
    return "".join(pieces)


def check_model_source(model: str) -> None:
    """A Hub repo id that offline loading cannot find is named as such: transformers' Auto classes, which
    load it next, say only that they could not connect."""
    from speechlm.speech_io.hub_files import hub_name, missing_from_cache, not_cached_message

    if hub_name(model) is None and not Path(model).exists():  # a path: transformers would call it a bad repo id
        raise FileNotFoundError(f"--model {model}: no such directory (expected a saved SpeechLM directory or a Hub "
                                f"repo id, owner/name)")
    if missing_from_cache(model):
        raise FileNotFoundError(not_cached_message("--model", model))


def merge(checkpoint: str, out: str) -> Path:
    """A standalone copy of a checkpoint: LoRA merged into the backbone, base weights included."""
    import speechlm  # noqa: F401
    from speechlm.finetune.hub import merge_checkpoint

    if not (Path(checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a saved SpeechLM directory (no config.json)")
    out_dir = merge_checkpoint(checkpoint, out)
    print(f"merged {checkpoint} into {out_dir}")
    return out_dir


def push(checkpoint: str, repo_id: str, private: bool, merged: bool) -> str:
    """Upload a saved SpeechLM to the Hub with a generated model card; the token comes from HF_TOKEN or
    ``hf auth login``, as huggingface_hub finds it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    import speechlm  # noqa: F401
    from speechlm.finetune.hub import push as push_to_hub

    try:
        url = push_to_hub(checkpoint, repo_id, private=private, merged=merged)
    except (HfHubHTTPError, OfflineModeIsEnabled) as error:
        # The message of a Hub error names the repo and the HTTP status, never the token.
        raise OSError(f"{repo_id}: upload failed ({str(error).splitlines()[0]})") from error
    print(f"pushed {checkpoint} to {repo_id}: {url}")
    return url


def evaluate(model: str, task: str, data: str, out: str | None, settings: dict) -> dict:
    """Metrics of a saved SpeechLM over a manifest: a table on the terminal and a JSON report."""
    import json

    from accelerate import PartialState

    from speechlm.evaluation import EvalSettings, format_table, run_evaluation

    check_model_source(model)
    report = run_evaluation(model, task, data, EvalSettings(**settings))
    if not PartialState().is_main_process:  # every rank holds the gathered report; one writes it
        return report
    print(format_table(report))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {out}")
    return report


def prepare(manifest: str, codec: str, out: str, layers: str, batch_size: int, chunk_size: int,
            max_bad_fraction: float, allow_extra_fields: bool = False) -> object:
    """Check every audio file of a manifest (or dataset) and extract its codec units into ``out``."""
    from speechlm.finetune.prepare import prepare as run_prepare

    report = run_prepare(manifest, codec, out, layers=layers, batch_size=batch_size, chunk_size=chunk_size,
                         max_bad_fraction=max_bad_fraction, allow_extra_fields=allow_extra_fields)
    if report.bad:
        print(f"{len(report.bad)} bad examples skipped, listed with reasons in {Path(out) / 'report.json'}")
    print(f"{report.prepared} of {report.total} examples prepared in {out}")
    return report


def answer(manifest: str, backbone: str, out: str, settings: dict, overwrite: bool, allow_extra_fields: bool,
           device: str | None, dtype: str | None) -> object:
    """Write the manifest to ``out`` with the backbone's greedy answer to each row's text as its ``answer``:
    spoken-instruction data (``s2t_instruct``) that teaches the adapter what the backbone does with the text."""
    from speechlm.finetune.self_answers import AnswerSettings, answer_manifest

    report = answer_manifest(manifest, out, backbone, AnswerSettings(**settings), overwrite=overwrite,
                             allow_extra_fields=allow_extra_fields, device=device, dtype=dtype)
    print(report.summary())
    return report


def train(config: str, overrides: list[str]) -> Path:
    """Run a training recipe (YAML + ``key.sub=value`` overrides); plain, or under accelerate/torchrun/deepspeed."""
    from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
    from speechlm.finetune.config import TrainConfig
    from speechlm.finetune.recipe import run

    settings = build_dataclass(TrainConfig, apply_overrides(read_yaml(config), overrides), where="")
    out_dir = run(settings)
    print(f"saved to {out_dir}")
    return out_dir


def whisper_units(checkpoint: str, manifests: list[str], out: str, blocks: int, size: int, max_clips: int,
                  seed: int) -> Path:
    """Cut a Whisper encoder into a unit codec, its codebook k-means-filled from the manifests' clips."""
    from speechlm.adapters.building import build_whisper_unit_codec
    from speechlm.finetune.vocoder_training import manifest_clips
    from speechlm.speech_io.audio import load_audio

    clips = [load_audio(clip) for clip in manifest_clips(manifests, max_clips)]
    codec = build_whisper_unit_codec(checkpoint, clips, encoder_blocks=blocks, codebook_size=size, seed=seed)
    codec.save_pretrained(out)
    print(f"saved a whisper-units codec ({size} units from block {blocks}, {len(clips)} clips) to {out}; "
          f"train its vocoder with: speechlm train-vocoder --codec {out} --layers 1 MANIFEST")
    return Path(out)


def train_vocoder(codec: str, manifests: list[str], layers: int, overrides: list[str]) -> Path:
    """Train a vocoder for a codec's units (``layers`` RVQ layers) on the manifests' clips; saved in the codec's
    folder, which then decodes with it (a whisper-units codec, or a SpeechTokenizer whose decoder is untrained)."""
    from speechlm.configfile import apply_overrides, build_dataclass
    from speechlm.finetune.vocoder_training import VocoderTraining, train_codec_vocoder
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.vocoder import VocoderConfig

    loaded = load_codec(codec)  # the codebooks' size and width are the codec's
    values = apply_overrides({"vocoder": {"num_layers": layers, "codebook_size": loaded.codebook_size,
                                          "codebook_dimension": loaded.codebook_dimension}, "training": {}}, overrides)
    config = build_dataclass(VocoderConfig, values["vocoder"], where="vocoder")
    settings = build_dataclass(VocoderTraining, values["training"], where="training")
    out, report = train_codec_vocoder(codec, manifests, config, settings, codec=loaded)
    print(f"{report.summary()}; saved to {out}")
    return out


def train_speech_decoder(codec: str, manifests: list[str], overrides: list[str]) -> Path:
    """Train a speech decoder (text -> the codec's units) on the manifests' clips and texts; saved in the codec's
    folder, whose models then speak through it: the LM writes the text, the decoder speaks it."""
    from speechlm.configfile import apply_overrides, build_dataclass
    from speechlm.finetune.speech_decoder_training import SpeechDecoderTraining, train_codec_speech_decoder
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.speech_decoder import SpeechDecoderConfig

    loaded = load_codec(codec)
    values = apply_overrides({"speech_decoder": {"codebook_size": loaded.codebook_size}, "training": {}}, overrides)
    config = build_dataclass(SpeechDecoderConfig, values["speech_decoder"], where="speech_decoder")
    settings = build_dataclass(SpeechDecoderTraining, values["training"], where="training")
    out, report = train_codec_speech_decoder(codec, manifests, config, settings, codec=loaded)
    print(f"{report.summary()}; saved to {out}")
    return out


def train_completion(codec: str, manifests: list[str], overrides: list[str]) -> Path:
    """Train a completion model (the LM's layer-1 units -> all of the codec's layers, in a voice prompt's voice)
    on the manifests' clips; saved in the codec's folder (`SpeechTokenizerCodec.complete` uses it)."""
    from speechlm.configfile import apply_overrides, build_dataclass
    from speechlm.finetune.completion_training import CompletionTraining, train_codec_completion
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.completion import CompletionConfig

    loaded = load_codec(codec)
    values = apply_overrides({"completion": {"num_layers": loaded.n_q, "codebook_size": loaded.codebook_size,
                                             "codebook_dimension": loaded.codebook_dimension}, "training": {}},
                             overrides)
    config = build_dataclass(CompletionConfig, values["completion"], where="completion")
    settings = build_dataclass(CompletionTraining, values["training"], where="training")
    out, report = train_codec_completion(codec, manifests, config, settings, codec=loaded)
    print(f"{report.summary()}; saved to {out}")
    return out


def convert_whisper_ct2(src: list[str], out: str, dtype: str) -> Path:
    """Convert a CTranslate2 (faster-whisper) Whisper model to openai-whisper's ``.pt``."""
    from speechlm.adapters.whisper_ct2 import convert_whisper_ct2 as convert

    path = convert(src[0] if len(src) == 1 else src, out, dtype=dtype)
    print(f"saved openai-whisper checkpoint to {path}")
    return path


def serve(model: str, options: dict, chat_page: bool = False) -> None:
    """Serve a saved SpeechLM over HTTP until interrupted: OpenAI's ``/v1/chat/completions`` and ``/v1/models``
    (and with ``chat_page`` the voice chat page at ``/``). The API key comes from ``--api-key`` or the
    environment's ``SPEECHLM_API_KEY``."""
    from speechlm.serving.settings import API_KEY_ENV, ServeSettings

    try:
        from speechlm.serving.server import serve as run_server
    except ImportError as error:
        raise ValueError(f"serving needs the serve extra: pip install 'speechlm[serve]' ({error})") from error

    device, dtype, log_level = options.pop("device"), options.pop("dtype"), options.pop("log_level")
    options["api_key"] = options["api_key"] if options["api_key"] is not None else os.environ.get(API_KEY_ENV)
    settings = ServeSettings(**options, chat_page=chat_page)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    what = "voice chat page" if chat_page else "OpenAI-compatible API"
    print(f"serving {model} ({what}) at http://{shown}:{settings.port}"
          f"{'/' if chat_page else '/v1'}{' (API key required)' if settings.api_key else ''}", file=sys.stderr)
    run_server(model, settings, device=device, dtype=dtype, log_level=log_level)


def temperature_list(value: str) -> tuple[float, ...]:
    """``"0,0.2,0.4"`` -> ``(0.0, 0.2, 0.4)``: argparse names the option and value when this fails
    (`EvalSettings` checks the values)."""
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def none_or_float(value: str) -> float | None:
    """``"none"`` -> None, else the number: argparse names the option and value when this fails."""
    if value.strip().lower() in ("none", "null"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {value!r}") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from speechlm.serving.settings import ServeSettings

    defaults = ServeSettings()
    p.add_argument("model", help="a saved SpeechLM directory or Hub id")
    p.add_argument("--host", default=defaults.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=defaults.port, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route (default: "
                                     "$SPEECHLM_API_KEY, else no key)")
    p.add_argument("--model-name", help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="requests decoded together in one batch")
    p.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                   help="requests that may wait for the model; past it a 429")
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                   help="text tokens of an answer when the request does not say")
    p.add_argument("--max-speech-units", type=int, default=defaults.max_speech_units,
                   help="bound on a spoken answer (50 units a second)")
    p.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                   help="largest request body (base64 audio included)")
    p.add_argument("--device", help="torch device for the model (default: where it loads, the CPU)")
    p.add_argument("--dtype", help="load the weights as this dtype (e.g. bfloat16; default: float32)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_options(a: argparse.Namespace) -> dict:
    return dict(host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
                max_batch_size=a.max_batch_size, max_waiting=a.max_waiting,
                default_max_tokens=a.default_max_tokens, max_speech_units=a.max_speech_units,
                max_request_bytes=a.max_request_bytes, device=a.device, dtype=a.dtype, log_level=a.log_level)


def build_parser() -> argparse.ArgumentParser:
    from speechlm.constraints import OUTPUT_MODES
    from speechlm.evaluation import EVAL_TASKS, LM_DTYPES, EvalSettings
    from speechlm.finetune.self_answers import AnswerSettings
    from speechlm.responding import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_SPEECH_UNITS, SPEECH_BY

    parser = argparse.ArgumentParser(prog="speechlm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # The deepspeed launcher puts --local_rank=N before the subcommand (LOCAL_RANK in the environment says
    # the same, and is what the Trainer reads), so `deepspeed $(which speechlm) train ...` runs as written.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("init", help="build a SpeechLM from a model YAML and save it")
    p.add_argument("config", help="model YAML (component paths, or tiny random dims)")
    p.add_argument("--out", required=True, help="directory to save the model and its tokenizer to")
    p.set_defaults(run=lambda a: init(a.config, a.out, a.overrides), takes_overrides=True)

    p = commands.add_parser("generate", help="one response to audio and/or text")
    p.add_argument("--model", required=True, help="a saved SpeechLM directory or Hub id")
    p.add_argument("--audio", help="an audio file (wav, flac, ogg, opus, mp3)")
    p.add_argument("--text", help="a text prompt (with --audio: the instruction about it)")
    p.add_argument("--output", choices=OUTPUT_MODES, default="text",
                   help="respond with text, speech, or text then its speech")
    p.add_argument("--out-audio", help="wav file for the spoken response (speech outputs)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="bound on the text of the response")
    p.add_argument("--max-speech-units", type=int, default=DEFAULT_MAX_SPEECH_UNITS,
                   help="bound on the speech (50 units a second)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--follow-transcript", type=float,
                   help="a model with a reader, asked to transcribe: log-odds the next token of the reader's "
                        "transcript gains (e.g. 2; default: the LM alone)")
    p.add_argument("--speech-by", choices=SPEECH_BY, default="auto",
                   help="who speaks: the codec's speech decoder, the LM writing the text (auto: where the codec has "
                        "one), or the LM generating the units itself (lm)")
    p.add_argument("--voice", help="speak in this recording's voice (1 s or more; a codec with a completion model: "
                                   "speechlm train-completion)")
    p.set_defaults(run=lambda a: generate(
        a.model, a.audio, a.text, a.output, a.out_audio, a.max_new_tokens, a.max_speech_units,
        {key: value for key, value in (("do_sample", a.do_sample or None), ("temperature", a.temperature),
                                       ("top_p", a.top_p), ("top_k", a.top_k),
                                       ("follow_transcript", a.follow_transcript), ("speech_by", a.speech_by))
         if value is not None}, a.voice))

    p = commands.add_parser("merge", help="a standalone checkpoint: LoRA merged, base weights included")
    p.add_argument("checkpoint", help="a saved SpeechLM directory")
    p.add_argument("--out", required=True, help="directory for the merged checkpoint")
    p.set_defaults(run=lambda a: merge(a.checkpoint, a.out))

    p = commands.add_parser("push", help="upload a saved SpeechLM to the Hub with a model card")
    p.add_argument("checkpoint", help="a saved SpeechLM directory")
    p.add_argument("repo_id", help="the Hub repo, e.g. your-name/speechlm-smollm2")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--merged", action="store_true", help="upload a merged standalone checkpoint instead")
    p.set_defaults(run=lambda a: push(a.checkpoint, a.repo_id, a.private, a.merged))

    p = commands.add_parser("eval", help="evaluate a saved SpeechLM on a manifest")
    p.add_argument("--model", required=True, help="a saved SpeechLM directory or Hub id")
    p.add_argument("--task", required=True, choices=EVAL_TASKS, help="what to measure")
    p.add_argument("--data", required=True, help="a JSONL manifest (see speechlm.evaluation)")
    p.add_argument("--out", help="where to write the JSON report")
    evaluation = EvalSettings()
    p.add_argument("--batch-size", type=int, default=evaluation.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=evaluation.max_new_tokens)
    p.add_argument("--max-speech-units", type=int, default=evaluation.max_speech_units)
    p.add_argument("--judge", help="tts: an openai-whisper .pt that transcribes the generated speech")
    p.add_argument("--judge-cache", help="tts: a JSON file that keeps what the judge heard of each reference, "
                                         "reused while the judge, the codec's decoder and the units are the same")
    p.add_argument("--output", default=evaluation.output, choices=OUTPUT_MODES,
                   help="latency: the response mode to time")
    p.add_argument("--speech-by", choices=SPEECH_BY, default=evaluation.speech_by,
                   help="tts and latency: who speaks (auto: the codec's speech decoder where it has one, else the LM)")
    p.add_argument("--tts-temperature", type=float, default=evaluation.tts_temperature,
                   help="tts: the speech units' sampling temperature (default 0: greedy; sampling is seeded)")
    p.add_argument("--temperatures", type=temperature_list, default=evaluation.temperatures,
                   help="text answers: temperatures tried in turn where the answer loops, as openai-whisper "
                        "transcribes (e.g. 0,0.2,0.4,0.6,0.8,1; default 0: greedy only)")
    p.add_argument("--asr-follow-transcript", type=float, default=evaluation.asr_follow_transcript,
                   help="asr, a model with a reader: log-odds the next token of the reader's transcript gains "
                        "(0: the LM alone)")
    p.add_argument("--asr-transcript-fallback", type=none_or_float, default=evaluation.asr_transcript_fallback,
                   help="asr, following the transcript: a transcription whose word errors against the reader's "
                        "transcript are above this share of its words has run on, and the transcript stands "
                        "instead (none: never)")
    p.add_argument("--lm-dtype", choices=LM_DTYPES,
                   help="the language model's weights while evaluating (bfloat16: ~0.7x the time of a spoken "
                        "answer on a CPU with AVX-512 BF16; the audio side keeps its dtype; default: as saved)")
    p.set_defaults(run=lambda a: evaluate(a.model, a.task, a.data, a.out, dict(
        batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, max_speech_units=a.max_speech_units,
        judge=a.judge, judge_cache=a.judge_cache, output=a.output, speech_by=a.speech_by, tts_temperature=a.tts_temperature,
        temperatures=a.temperatures, asr_follow_transcript=a.asr_follow_transcript,
        asr_transcript_fallback=a.asr_transcript_fallback, lm_dtype=a.lm_dtype)))

    p = commands.add_parser("prepare", help="check audio and extract codec units for training")
    p.add_argument("manifest", help="JSONL manifest, saved dataset directory, or audiofolder directory")
    p.add_argument("--codec", required=True, help="a codec folder (SpeechTokenizer's config.json + .pt, or whisper "
                                                  "units'), or a Hub repo id and folder: "
                                                  "fnlp/SpeechTokenizer/speechtokenizer_hubert_avg")
    p.add_argument("--out", required=True, help="output directory; a re-run resumes there")
    p.add_argument("--layers", choices=["1", "all"], default="1", help="RVQ layers to keep (1: semantic)")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded together")
    p.add_argument("--chunk-size", type=int, default=256, help="examples per shard (the unit of resumption)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="fail if more examples than this are bad")
    p.add_argument("--allow-extra-fields", action="store_true",
                   help="ignore manifest fields speechlm does not know (by default each is an error naming it)")
    p.set_defaults(run=lambda a: prepare(a.manifest, a.codec, a.out, a.layers, a.batch_size, a.chunk_size,
                                         a.max_bad_fraction, a.allow_extra_fields))

    p = commands.add_parser("answer", help="add the backbone's own answer to each row's text (spoken-instruction "
                                           "data without labels)")
    p.add_argument("manifest", help="JSONL manifest whose rows' 'text' the backbone answers")
    answering = AnswerSettings()
    p.add_argument("--backbone", required=True, help="the text LM the SpeechLM is built on (a directory or Hub id)")
    p.add_argument("--out", required=True, help="the answered manifest to write (JSONL); an interrupted run resumes")
    p.add_argument("--system-prompt", help="the system turn before each text: the training recipe's "
                                           "data.system_prompt (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=answering.max_new_tokens,
                   help="an answer's bound (a longer one is cut to its complete sentences and marked answer_truncated)")
    p.add_argument("--batch-size", type=int, default=answering.batch_size,
                   help="texts of one token length answered together")
    p.add_argument("--overwrite", action="store_true", help="replace the answers rows already have")
    p.add_argument("--allow-extra-fields", action="store_true",
                   help="ignore manifest fields speechlm does not know (by default each is an error naming it)")
    p.add_argument("--device", help="torch device for the backbone (default: the CPU)")
    p.add_argument("--dtype", help="load the backbone's weights as this dtype (e.g. bfloat16; default: the "
                                   "checkpoint's own)")
    p.set_defaults(run=lambda a: answer(a.manifest, a.backbone, a.out, dict(
        system_prompt=a.system_prompt, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size), a.overwrite,
        a.allow_extra_fields, a.device, a.dtype))

    p = commands.add_parser("train", help="run a training recipe (YAML + key.sub=value overrides)")
    p.add_argument("config", help="training recipe YAML, e.g. configs/tiny/train.yaml")
    p.set_defaults(run=lambda a: train(a.config, a.overrides), takes_overrides=True)

    p = commands.add_parser("whisper-units", help="a unit codec from a Whisper encoder's first blocks and k-means")
    p.add_argument("checkpoint", help="an openai-whisper checkpoint (.pt)")
    p.add_argument("manifests", nargs="+", help="JSONL manifests whose 'audio' clips fill the codebook")
    p.add_argument("--out", required=True, help="the codec's directory")
    p.add_argument("--blocks", type=int, default=4, help="encoder blocks kept; units are read after the last")
    p.add_argument("--size", type=int, default=1024, help="units (k-means codes); the model's num_speech_units")
    p.add_argument("--max-clips", type=int, default=400, help="clips the k-means reads (an even spread)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=lambda a: whisper_units(a.checkpoint, a.manifests, a.out, a.blocks, a.size, a.max_clips,
                                               a.seed))

    p = commands.add_parser("train-vocoder", help="train a vocoder for a codec without a trained decoder")
    p.add_argument("manifests", nargs="+", help="JSONL manifests whose 'audio' clips it trains on")
    p.add_argument("--codec", required=True, help="the codec's directory; the vocoder is saved in it")
    p.add_argument("--layers", type=int, default=1, help="RVQ layers it reads (1: the LM's units; 8: all)")
    p.set_defaults(run=lambda a: train_vocoder(a.codec, a.manifests, a.layers, a.overrides), takes_overrides=True)

    p = commands.add_parser("train-speech-decoder", help="train a speech decoder (text -> the codec's units) that "
                                                         "speaks for the LM")
    p.add_argument("manifests", nargs="+", help="JSONL manifests whose 'audio' clips and 'text' it trains on")
    p.add_argument("--codec", required=True, help="the codec's directory; the speech decoder is saved in it")
    p.set_defaults(run=lambda a: train_speech_decoder(a.codec, a.manifests, a.overrides), takes_overrides=True)

    p = commands.add_parser("train-completion", help="train RVQ completion (layer 1 -> all of a codec's layers, in a "
                                                     "voice prompt's voice)")
    p.add_argument("manifests", nargs="+", help="JSONL manifests whose 'audio' clips it trains on")
    p.add_argument("--codec", required=True, help="the codec's directory (SpeechTokenizer); the model is saved in it")
    p.set_defaults(run=lambda a: train_completion(a.codec, a.manifests, a.overrides), takes_overrides=True)

    for name, chat_page, text in (("serve", False, "serve a SpeechLM over an OpenAI-compatible HTTP API"),
                                  ("chat-ui", True, "serve a SpeechLM with a voice chat page (and the same API)")):
        p = commands.add_parser(name, help=text)
        add_serve_arguments(p)
        p.set_defaults(run=lambda a, chat_page=chat_page: serve(a.model, serve_options(a), chat_page))

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
    code = 0
    try:
        args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"speechlm {args.command}: error: {message}", file=sys.stderr)
        code = 2
    leave_process_group(code)
    return code


def leave_process_group(code: int) -> None:
    """End a worker of a multi-process launch cleanly: 2-process gloo jobs that leave the process group to
    interpreter shutdown abort now and then ("terminate called without an active exception") after
    finishing their work, so close it and exit at once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()  # on an error the other ranks may never arrive
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
