"""The training recipe, top to bottom: build the model and the processor; load the examples; read the
training clips ahead and pre-align the projector (CTC), if asked; build the datasets and the trainer;
train; save (and push).
``speechlm train CONFIG.yaml [key.sub=value ...]`` runs `run`; so do ``accelerate launch``, ``torchrun``
and ``deepspeed`` around that command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from speechlm.adapters.audio_encoder import native_bfloat16
from speechlm.adapters.building import build_codec, build_speechlm
from speechlm.adapters.building import build_processor as processor_for
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.adapters.modes import apply_training_mode
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.finetune.alignment import AlignmentResult, align_projector
from speechlm.finetune.collator import SpeechLMCollator
from speechlm.finetune.config import TrainConfig
from speechlm.finetune.examples import Example
from speechlm.finetune.hub import push
from speechlm.finetune.mixture import TaskMixtureDataset
from speechlm.finetune.read_ahead import ReadAhead
from speechlm.finetune.read_ahead import read_ahead as read_training_clips
from speechlm.finetune.sources import load_examples
from speechlm.finetune.tasks import RenderSettings
from speechlm.finetune.trainer import (
    MarkCompleteCheckpoints,
    SpeechLMTrainer,
    TrainingClock,
    newest_complete_checkpoint,
)
from speechlm.speech_io.processor import (
    CODEC_FOLDER,
    UNSEPARATED,
    SpeechLMProcessor,
    saved_processor_settings,
)

logger = logging.getLogger(__name__)

# Mode changes a saved model can take on load; others need `speechlm merge` or a fresh build.
MODE_CHANGES = {("frozen", "lora"), ("frozen", "full")}


def build_model(config: TrainConfig) -> tuple[SpeechLMForCausalLM, object]:
    """A new SpeechLM from ``config.model``, or the saved one at ``config.init_from`` in ``model.mode``.

    Runs before TrainingArguments exist, on purpose: under ZeRO-3 those make transformers build models
    already partitioned, and new vocabulary rows are initialised from the (then empty) text rows.
    """
    if config.init_from is None:
        model, tokenizer = build_speechlm(config.model)
    else:
        model = SpeechLMForCausalLM.from_pretrained(config.init_from)
        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
        change_mode(model, config.model.mode, config.model.lora, config.model.lora_scope,
                    config.model.train_audio_encoder)
    model.reading_cache = ReadingCache()  # epochs and evaluations read the same clips with a frozen encoder
    logger.info("%s", model.parameter_counts())
    return model.train(), tokenizer


def change_mode(model: SpeechLMForCausalLM, mode: str, lora: dict, lora_scope: str | None,
                train_audio_encoder: bool) -> None:
    """Stage 2 starts from stage 1: e.g. a frozen-backbone checkpoint that now gets LoRA adapters. ``lora``
    changes the saved model's LoRA settings key by key; ``lora_scope`` None keeps its scope."""
    config = model.config
    if mode != config.mode and (config.mode, mode) not in MODE_CHANGES:
        raise ValueError(f"init_from: the saved model is in mode {config.mode!r} and cannot switch to {mode!r}; "
                         f"possible: {sorted(f'{a}->{b}' for a, b in MODE_CHANGES)} (merge LoRA with speechlm merge)")
    changes = {"lora_config": {**config.lora_config, **lora}, "mode": mode, "train_audio_encoder": train_audio_encoder,
               **({} if lora_scope is None else {"lora_scope": lora_scope})}
    before = {name: getattr(config, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(config, name, value)  # a strict config checks each value's type here
        config.check_settings()
    except Exception:
        for name, value in before.items():  # the loaded model stays as it was
            setattr(config, name, value)
        raise
    apply_training_mode(model)


def build_processor(config: TrainConfig, model: SpeechLMForCausalLM, tokenizer) -> SpeechLMProcessor:
    """The processor, with the codec the data's units came from (``data.codec``, else ``model.codec``)
    saved inside the model directory, so that the trained model speaks wherever it is moved."""
    data = config.data
    spec = config.model if data.codec is None else dataclasses.replace(config.model, codec=data.codec)
    codec = build_codec(spec)
    return processor_for(tokenizer, model.config, speech_input=data.speech_input, codec=codec,
                         codec_name_or_path=CODEC_FOLDER if codec is not None else None,
                         max_audio_seconds=data.max_audio_seconds, system_prompt=data.system_prompt,
                         audio_text_separator=audio_text_separator(config))


def audio_text_separator(config: TrainConfig) -> str:
    """``data.audio_text_separator``; where the recipe leaves it out, the one ``init_from``'s processor was saved
    with (a later stage keeps the request format its model learnt; ``""`` for a processor saved before the
    setting), else ``"\\n"``."""
    if config.data.audio_text_separator is not None:
        return config.data.audio_text_separator
    saved = saved_processor_settings(config.init_from) if config.init_from is not None else None
    if saved is None:
        return "\n"
    return saved.get("audio_text_separator", UNSEPARATED)


def load_training_examples(config: TrainConfig) -> list[Example]:
    return [example for source in config.data.train
            for example in load_examples(source, allow_extra_fields=config.data.allow_extra_fields)]


def fit_speaking_rate(config: TrainConfig, model: SpeechLMForCausalLM, examples: Sequence[Example]) -> float | None:
    """The speaking rate of the training speech (units per character, over every text and speech pair),
    set as the model's ``speech_units_per_character`` where ``data.fit_speaking_rate`` asks; the rate set."""
    pairs = [(text, units) for example in examples
             for text, units in ((example.text, example.units), (example.answer, example.answer_units))
             if text and text.strip() and units]
    if config.data.fit_speaking_rate and pairs:
        rate = sum(len(units) for _, units in pairs) / sum(len(text.strip()) for text, _ in pairs)
        model.config.speech_units_per_character = round(rate, 4)
        logger.info("speaking rate %.3f units a character, from %d pairs", rate, len(pairs))
    return model.config.speech_units_per_character


@contextlib.contextmanager
def training_reads(config: TrainConfig, model: SpeechLMForCausalLM) -> Iterator[None]:
    """Inside the block the reader decodes with ``training.reader_beam_size`` (null: the model's own beam)."""
    beam = config.training.reader_beam_size
    if beam is None:
        yield
        return
    if model.audio_reader is None:
        raise ValueError(f"training.reader_beam_size={beam} sets the whisper reader's beam, and this model has no "
                         f"reader (model.projector.reader: whisper); leave it out")
    with model.audio_reader.beam(beam):
        yield


def clips_to_read_ahead(config: TrainConfig, examples: Sequence[Example], dataset: TaskMixtureDataset
                        ) -> list[Example]:
    """The examples whose clips the training reads: those the dataset's samples draw (the quick start's plan, 960
    samples of ASR and spoken requests 1:1 over the 960 clips its job speaks, draws 487 of them), and every
    example where the CTC pre-alignment runs (it draws from all that have audio and text)."""
    return list(examples) if config.alignment.max_steps > 0 else dataset.sampled_examples()


def read_ahead(config: TrainConfig, model: SpeechLMForCausalLM, processor: SpeechLMProcessor,
               examples: Sequence[Example], progress: bool = True) -> ReadAhead | None:
    """The clips of ``examples`` (`clips_to_read_ahead`) read once into the model's reading cache
    (``training.read_ahead``), as the training steps will read them; None when off."""
    if not config.training.read_ahead:
        return None
    readings = config.training.readings_file
    loaded = model.reading_cache.load(readings) if readings and Path(readings).is_file() else 0
    with training_reads(config, model):
        result = read_training_clips(model, processor, examples, progress=progress)
    result.from_file = loaded
    if readings and result.read:
        model.reading_cache.save(readings)
    return result


def align(config: TrainConfig, model: SpeechLMForCausalLM, tokenizer, examples: Sequence[Example],
          progress: bool = True) -> AlignmentResult | None:
    """CTC pre-alignment of the projector (``config.alignment``), before the Trainer; None when off.

    Every process of a distributed run does the same steps from the same seed (DDP starts from rank 0's
    weights in any case)."""
    if config.alignment.max_steps == 0:
        compressor = model.audio_compressor
        if compressor is not None and not compressor.is_aligned:
            raise ValueError("model.projector.compression='ctc' learns which frames to keep in the CTC "
                             "pre-alignment: set alignment.max_steps > 0 (or start from an aligned model: init_from)")
        return None
    training = config.training
    device = "cuda" if torch.cuda.is_available() and not training.use_cpu else "cpu"
    return align_projector(model, tokenizer, examples, config.alignment, n_mels=model.config.audio_config.n_mels,
                           max_audio_seconds=config.data.max_audio_seconds, device=device,
                           bf16=mixed_precision_bf16(training),
                           progress=progress)


def mixed_precision_bf16(training) -> bool:
    """``training.bf16``, except on a CPU without native bfloat16 (AVX-512 BF16 or AMX): there torch's bf16
    matmuls fall back to a single-threaded GEMM, many times slower than float32, so such a machine trains in
    float32, with a warning."""
    if not training.bf16:
        return False
    on_cpu = training.use_cpu or not torch.cuda.is_available()
    if on_cpu and not native_bfloat16("cpu"):
        logger.warning("training.bf16: this CPU has no native bfloat16 (AVX-512 BF16/AMX); bf16 matmuls would "
                       "run ~15x slower than float32 here, so training runs in float32")
        return False
    return True


def build_datasets(config: TrainConfig, processor: SpeechLMProcessor,
                   examples: Sequence[Example] | None = None) -> TaskMixtureDataset:
    data = config.data
    examples = load_training_examples(config) if examples is None else list(examples)
    settings = RenderSettings(speech_input=data.speech_input, interleave=data.interleave,
                              s2t_kl_rows=data.s2t_kl_rows)
    dataset = TaskMixtureDataset(examples, processor, data.tasks, settings=settings, num_samples=data.num_samples,
                                 max_length=data.max_length, seed=data.seed)
    logger.info("%d samples from %d examples: %s", len(dataset), len(examples), dict(dataset.task_counts()))
    return dataset


def build_trainer(config: TrainConfig, model: SpeechLMForCausalLM, processor: SpeechLMProcessor,
                  dataset: TaskMixtureDataset, callbacks: Sequence[TrainerCallback] = (),
                  clock: TrainingClock | None = None) -> SpeechLMTrainer:
    training = config.training
    passed = {name: getattr(training, name) for name in (
        "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
        "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type", "max_grad_norm", "optim",
        "logging_steps", "save_steps", "save_total_limit", "seed", "bf16", "fp16", "activation_checkpointing",
        "deepspeed", "use_cpu", "dataloader_num_workers", "report_to", "run_name")}
    passed["bf16"] = mixed_precision_bf16(training)
    args = TrainingArguments(
        **passed,
        # Our items are already model inputs; nothing for the Trainer to drop.
        remove_unused_columns=False,
        # A frozen or LoRA backbone under activation checkpointing: the reentrant variant would need
        # inputs that require grad; the non-reentrant one needs nothing, and inputs get grads anyway.
        activation_checkpointing_kwargs={"use_reentrant": False} if training.activation_checkpointing else None,
        # DDP: the audio tower and projector sit idle on text-only batches.
        ddp_find_unused_parameters=True,
        save_strategy="steps",
    )
    return SpeechLMTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                           data_collator=SpeechLMCollator.from_processor(processor),
                           length_grouping=config.data.length_grouping, max_minutes=training.max_minutes,
                           clock=clock, callbacks=[MarkCompleteCheckpoints(), *callbacks])


def train(config: TrainConfig, trainer: SpeechLMTrainer):
    checkpoint = newest_complete_checkpoint(config.training.output_dir) if config.training.resume else None
    if config.training.resume:
        logger.warning("resuming from %s", checkpoint or "nothing (no complete checkpoint): starting fresh")
    with training_reads(config, trainer.model):
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)


def save(config: TrainConfig, trainer: SpeechLMTrainer) -> Path:
    """The model in its own format (adapter-only for a frozen/LoRA backbone) and the processor, into
    ``output_dir``; then the Hub upload if asked. Every rank calls this (ZeRO-3 gathers weights)."""
    output_dir = Path(config.training.output_dir)
    trainer.save_model(str(output_dir))
    training = config.training
    if training.push_to_hub and trainer.is_world_process_zero():
        url = push(output_dir, training.hub_model_id, private=training.hub_private_repo, merged=training.hub_merged)
        logger.warning("pushed %s to %s", output_dir, url)
    return output_dir


def run(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    model, tokenizer = build_model(config)
    processor = build_processor(config, model, tokenizer)
    examples = load_training_examples(config)
    fit_speaking_rate(config, model, examples)
    dataset = build_datasets(config, processor, examples)
    read_ahead(config, model, processor, clips_to_read_ahead(config, examples, dataset))
    align(config, model, tokenizer, examples)
    trainer = build_trainer(config, model, processor, dataset, callbacks)
    train(config, trainer)
    return save(config, trainer)
