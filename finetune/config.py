"""The training recipe's settings: ``model`` (a `ModelSpec`), ``data`` and ``training`` sections.

Read with ``speechlm.configfile``: unknown keys and bad values are reported together, each naming the
key and what would be valid. ``training`` holds the HF ``TrainingArguments`` fields users know, under
their transformers 5 names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speechlm.adapters.building import ModelSpec
from speechlm.finetune.examples import TASK_NAMES
from speechlm.finetune.tasks import INTERLEAVE_LEVELS, S2T_KL_ROWS
from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.processor import SPEECH_INPUT_MODES

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
# schedules that can run by minutes (training.max_minutes): finetune.trainer.minute_schedule
MINUTE_SCHEDULES = ("linear", "cosine", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit")
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list, metadata={
        "help": "training data: `speechlm prepare` output dirs, JSONL manifests, or saved datasets"})
    allow_extra_fields: bool = field(default=False, metadata={
        "help": "ignore manifest fields speechlm does not know (by default each is an error naming it)"})
    tasks: dict[str, float] = field(default_factory=lambda: {"asr": 1.0}, metadata={
        "help": f"task -> sampling weight; tasks: {', '.join(TASK_NAMES)}"})
    speech_input: str = field(default="continuous", metadata={
        "help": "how speech enters: continuous (Whisper features) or discrete (codec units)"})
    num_samples: int | None = field(default=None, metadata={
        "help": "samples per epoch drawn from the mixture; null: as many as usable examples"})
    max_length: int = field(default=2048, metadata={"help": "samples longer than this many tokens are dropped"})
    max_audio_seconds: float = field(default=30.0, metadata={"help": "longer clips are refused (Whisper: 30 s)"})
    interleave: str = field(default="word", metadata={"help": "interleaved spans switch at word or sentence ends"})
    s2t_kl_rows: str = field(default="all", metadata={
        "help": "the s2t_kl task's rows: all (every clip with a transcript; unanswered ones distil an answer's "
                "first token) or answered (only rows with an answer, distilled whole)"})
    length_grouping: bool = field(default=True, metadata={
        "help": "batch samples of similar length (mega-batch sorting) to cut padding"})
    codec: str | None = field(default=None, metadata={
        "help": "SpeechTokenizer dir or Hub repo id and folder (as model.codec), for discrete input from audio "
                "that `prepare` did not encode"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system turn for conversations without one, saved with the processor so that inference "
                "uses it too; null: the chat template's default (\"\" for an empty one: shorter samples)"})
    audio_text_separator: str | None = field(default=None, metadata={
        "help": "text put between a clip and a text part beside it in a request (saved with the processor): \"\\n\" "
                "sets them apart, \"\" runs a clip's transcript slots into the instruction's text (the format of "
                "models trained before it); null: init_from's saved processor's, so a later stage keeps the "
                "format its model learnt, else \"\\n\""})
    seed: int = field(default=0, metadata={"help": "seed of the task mixture and the prompt choices"})
    fit_speaking_rate: bool = field(default=True, metadata={
        "help": "set the model's speech_units_per_character from the training data's text and speech pairs, so "
                "that generated speech keeps to the length of its text; false: keep the model's own"})

    def __post_init__(self):
        problems = ConfigProblems()
        problems.check(isinstance(self.train, list) and all(isinstance(p, str) for p in self.train),
                       f"train={self.train!r}: expected a list of paths")
        problems.check(bool(self.train), "train: list at least one dataset (prepare output, manifest, dataset)")
        for name, weight in self.tasks.items():
            problems.check(name in TASK_NAMES, f"tasks.{name}: unknown task; choose from {list(TASK_NAMES)}")
            problems.check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                           f"tasks.{name}={weight!r}: a weight must be a number >= 0")
        problems.check(any(isinstance(w, (int, float)) and w > 0 for w in self.tasks.values()),
                       f"tasks={self.tasks!r}: give at least one task a weight > 0")
        problems.check(self.speech_input in SPEECH_INPUT_MODES,
                       f"speech_input={self.speech_input!r}: choose one of {list(SPEECH_INPUT_MODES)}")
        problems.check(self.interleave in INTERLEAVE_LEVELS,
                       f"interleave={self.interleave!r}: choose one of {list(INTERLEAVE_LEVELS)}")
        problems.check(self.s2t_kl_rows in S2T_KL_ROWS,
                       f"s2t_kl_rows={self.s2t_kl_rows!r}: choose one of {list(S2T_KL_ROWS)}")
        problems.check(self.max_length >= 8, f"max_length={self.max_length}: must be >= 8")
        problems.check(self.num_samples is None or self.num_samples >= 1,
                       f"num_samples={self.num_samples}: must be >= 1 or null")
        problems.check(self.max_audio_seconds > 0, f"max_audio_seconds={self.max_audio_seconds}: must be > 0")
        problems.check(self.audio_text_separator is None or isinstance(self.audio_text_separator, str),
                       f"audio_text_separator={self.audio_text_separator!r}: expected a string (\"\" or \"\\n\")")
        problems.raise_if_any("data")


@dataclass
class TrainingConfig:
    output_dir: str = field(default="out/train", metadata={"help": "checkpoints and the final model go here"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_train_epochs decides"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the mixture (if max_steps=-1)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "samples per device per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: float = field(default=0, metadata={
        "help": "warm-up steps; a float < 1 is a fraction of the run (transformers 5 dropped warmup_ratio)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"one of {', '.join(LR_SCHEDULERS)}"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    optim: str = field(default="adamw_torch", metadata={"help": f"optimizer: {', '.join(OPTIMIZERS)}"})
    logging_steps: int = field(default=10, metadata={"help": "log loss (and padding fraction) every N steps"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints"})
    seed: int = field(default=42, metadata={"help": "seed of weights-side randomness (dropout, data order)"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision (GPU)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward: less memory, more compute"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json"})
    use_cpu: bool = field(default=False, metadata={"help": "train on the CPU (also makes torchrun use gloo)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "processes that load audio for batches"})
    report_to: str | list[str] = field(default="none", metadata={"help": f"loggers: {', '.join(REPORT_TO)}"})
    run_name: str | None = field(default=None, metadata={"help": "run name shown by the loggers"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest complete checkpoint in output_dir (fresh start if none)"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "stop after this many minutes of training steps (evaluations a callback runs pause the clock), and "
                "run the learning-rate schedule by minutes as well as by steps: a step's progress is the larger of "
                "step / max_steps and minutes / max_minutes, so the schedule ends when the time does on any machine "
                f"(lr_scheduler_type one of {', '.join(MINUTE_SCHEDULES)}); null: steps alone"})
    read_ahead: bool = field(default=False, metadata={
        "help": "before the first step, read every training clip once with the frozen encoder (and reader), in "
                "batches of similar length, into the model's reading cache; steps then only look them up (the "
                "whisper reader's decoding is about half of a CPU step otherwise). Not counted in max_minutes"})
    readings_file: str | None = field(default=None, metadata={
        "help": "with read_ahead: a file that keeps the readings between runs (loaded before reading ahead, written "
                "after when anything new was read); an entry counts only for the same clip and the same frozen "
                "weights and reader settings, so a stale one is never used. null: read every run"})
    reader_beam_size: int | None = field(default=None, metadata={
        "help": "the beam the whisper reader decodes the training clips with (read ahead and in the steps); the "
                "model keeps its own projector.reader_beam_size for evaluation and users. 1 (greedy) reads in about "
                "a third of the time of a beam of 5, and the LM learns from a slightly rougher transcript; null: the "
                "model's beam"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the final model to hub_model_id"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. user/speechlm-tiny"})
    hub_private_repo: bool = field(default=True, metadata={"help": "create the Hub repo as private"})
    hub_merged: bool = field(default=False, metadata={
        "help": "upload a merged standalone checkpoint (needed when the backbone is a local path)"})

    def __post_init__(self):
        problems = ConfigProblems()
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            problems.check(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be >= 1")
        problems.check(self.max_steps == -1 or self.max_steps >= 1, f"max_steps={self.max_steps}: -1 or >= 1")
        problems.check(self.max_steps >= 1 or self.num_train_epochs > 0,
                       f"num_train_epochs={self.num_train_epochs}: must be > 0 when max_steps=-1")
        problems.check(self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0")
        problems.check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0")
        problems.check(self.lr_scheduler_type in LR_SCHEDULERS,
                       f"lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {list(LR_SCHEDULERS)}")
        problems.check(self.optim in OPTIMIZERS, f"optim={self.optim!r}: choose one of {list(OPTIMIZERS)}")
        problems.check(self.save_total_limit is None or self.save_total_limit >= 1,
                       f"save_total_limit={self.save_total_limit}: must be >= 1 or null")
        problems.check(not (self.bf16 and self.fp16), "bf16 and fp16: choose one")
        problems.check(self.max_minutes is None or self.max_minutes > 0, f"max_minutes={self.max_minutes}: must be > 0 or null")
        problems.check(self.max_minutes is None or self.lr_scheduler_type in MINUTE_SCHEDULES,
                       f"lr_scheduler_type={self.lr_scheduler_type!r} does not run by minutes: with max_minutes choose "
                       f"one of {list(MINUTE_SCHEDULES)}")
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        for report in reports:
            problems.check(report in REPORT_TO, f"report_to={report!r}: choose from {list(REPORT_TO)}")
        problems.check(self.readings_file is None or self.read_ahead,
                       f"readings_file={self.readings_file!r}: keeps what read_ahead reads; set read_ahead: true")
        problems.check(self.reader_beam_size is None or self.reader_beam_size >= 1,
                       f"reader_beam_size={self.reader_beam_size}: must be >= 1 (1: greedy) or null")
        problems.check(not self.push_to_hub or bool(self.hub_model_id),
                       "push_to_hub=true needs hub_model_id (e.g. user/speechlm-tiny)")
        problems.raise_if_any("training")


ALIGNMENT_VOCABULARIES = ("transcripts", "all")


@dataclass
class AlignmentConfig:
    """CTC pre-alignment of the projector before the Trainer (`speechlm.finetune.alignment`)."""

    max_steps: int = field(default=0, metadata={
        "help": "CTC steps of the projector before the Trainer; 0: no pre-alignment"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "stop earlier after this many minutes (encoding the clips included); null: max_steps decides"})
    batch_size: int = field(default=32, metadata={"help": "clips per CTC step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the projector"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    max_clips: int | None = field(default=None, metadata={
        "help": "clips (with audio and text) encoded for the stage; their encoder outputs stay in memory "
                "(~50 kB per second of audio for Whisper base); null: every one"})
    seed: int = field(default=0, metadata={"help": "seed of the clip choice and order"})
    vocabulary: str = field(default="transcripts", metadata={
        "help": "tokens the CTC softmax runs over: `transcripts` (those the training transcripts use) or `all` "
                "(the backbone's whole text vocabulary: any word can come out, at ~20x the softmax's cost)"})

    def __post_init__(self):
        problems = ConfigProblems()
        problems.check(self.vocabulary in ALIGNMENT_VOCABULARIES,
                       f"vocabulary={self.vocabulary!r}: choose one of {list(ALIGNMENT_VOCABULARIES)}")
        problems.check(self.max_steps >= 0, f"max_steps={self.max_steps}: must be >= 0 (0: no pre-alignment)")
        problems.check(self.max_minutes is None or self.max_minutes > 0,
                       f"max_minutes={self.max_minutes}: must be > 0 or null")
        problems.check(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        problems.check(self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0")
        problems.check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0")
        problems.check(self.max_clips is None or self.max_clips >= 1, f"max_clips={self.max_clips}: must be >= 1")
        problems.raise_if_any("alignment")


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec, metadata={
        "help": "the SpeechLM to build (as `speechlm init`), or its mode and LoRA settings with init_from"})
    init_from: str | None = field(default=None, metadata={
        "help": "a saved SpeechLM to start from (e.g. stage 1's output); model.mode/lora then apply to it"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data, task mixture, lengths"})
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig, metadata={
        "help": "CTC pre-alignment of the projector before the Trainer (off unless max_steps > 0)"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "HF Trainer settings"})
