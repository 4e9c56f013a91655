"""`SpeechLMConfig`: the backbone's own config nested beside the Whisper-encoder and projector settings.

Dimensions live in exactly one sub-config and are read from there: the LM width from ``text_config``,
the encoder width from ``audio_config``, the stacking factor from ``projector_config``.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.units import SPECIAL_SPEECH_TOKENS, speech_token_ids

TRAINING_MODES = ("frozen", "lora", "qlora", "full")
# "all": LoRA acts everywhere; "audio": on rows that hear audio; "speech": also on the speech tokens of any
# row; "clip": only on a clip's own positions. Gated, text runs the base weights.
LORA_SCOPES = ("all", "audio", "speech", "clip")
ENCODER_DTYPES = ("float32", "bfloat16")  # audio_encoder_dtype
# peft ``LoraConfig`` settings a model gets where its recipe does not say (peft's own: lora_alpha 8, no dropout)
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
# where configs saved before `lora_config` kept those settings, and their key in it
FLAT_LORA_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                  "lora_target_modules": "target_modules"}


@strict
class SpeechLMAudioConfig(PreTrainedConfig):
    """The dimensions of an openai-whisper ``AudioEncoder`` (field names as in ``whisper.model.ModelDimensions``).

    Whisper sizes: tiny 384/6/4, base 512/8/6, small 768/12/12, medium 1024/16/24, large 1280/20/32
    (n_audio_state / n_audio_head / n_audio_layer); large-v3 uses ``n_mels=128``.
    """

    model_type = "speechlm_audio"

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 512
    n_audio_head: int = 8
    n_audio_layer: int = 6
    # Whisper's text decoder, used only by the `whisper` reader: its width and heads are the encoder's
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int | None = None
    n_text_head: int | None = None
    n_text_layer: int = 6

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.n_text_state is None:
            self.n_text_state = self.n_audio_state
        if self.n_text_head is None:
            self.n_text_head = self.n_audio_head
        problems = ConfigProblems()
        if self.n_mels not in (80, 128):
            problems.append(f"audio_config.n_mels={self.n_mels}: Whisper uses 80 or 128 mel bins")
        for name in ("n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_text_ctx", "n_text_state",
                     "n_text_head", "n_text_layer"):
            if getattr(self, name) < 1:
                problems.append(f"audio_config.{name}={getattr(self, name)}: must be >= 1")
        for side in ("audio", "text"):
            state, heads = getattr(self, f"n_{side}_state"), getattr(self, f"n_{side}_head")
            if heads >= 1 and state % heads:
                problems.append(f"audio_config.n_{side}_state={state} is not divisible by n_{side}_head={heads}")
        problems.raise_if_any("SpeechLMAudioConfig")

    @property
    def hidden_size(self) -> int:
        return self.n_audio_state


# "none": every projected frame is an LM position; "ctc": one per spoken token (needs the CTC pre-alignment)
COMPRESSIONS = ("none", "ctc")
# "none": the LM gets the projected frames; "whisper": also Whisper's transcript of the clip (`adapters.readers`)
READERS = ("none", "whisper")


@strict
class SpeechLMProjectorConfig(PreTrainedConfig):
    """The adapter from Whisper frames (50 Hz) to LM embeddings; ``projector_type`` names a registered variant.
    ``compression="ctc"`` keeps one projected frame per spoken token (`speechlm.adapters.compression`).
    ``reader="whisper"`` adds Whisper's own transcript of each clip after its frames
    (`speechlm.adapters.readers`): ``reader_tokens_per_second`` LM positions a second of audio for it, the
    clip followed by ``reader_silence_seconds`` of silence for Whisper's decoder (rounded up to whole 2 s
    windows, at most 30 s; 30 gives every clip openai-whisper's own 30 s input), ``reader_beam_size`` 1 (greedy) or a beam, ``reader_language`` an ISO code or null (detected),
    ``reader_prompt`` text Whisper's decoder reads as if it came before each clip (openai-whisper's
    ``initial_prompt``: the names and terms of a domain, spelled as they should come out) or null, and
    ``reader_lm_weight`` how much the backbone's log-likelihood of each of the beam's transcripts counts
    beside Whisper's when the best is chosen (0: Whisper's choice alone; greedy decoding has no choice), and
    ``reader_lm_context`` text the backbone reads as the chat's system turn before each transcript it ranks
    (sentences a domain's users say, its names: domain-prompted rescoring, which unlike ``reader_prompt``
    only chooses among what Whisper heard) or null (the chat template's default system turn)."""

    model_type = "speechlm_projector"

    projector_type: str = "mlp"
    stack_factor: int = 5
    hidden_size: int = 2048
    compression: str = "none"
    reader: str = "none"
    reader_tokens_per_second: int = 8
    reader_silence_seconds: float = 30.0
    reader_beam_size: int = 1
    reader_language: str | None = "en"
    reader_prompt: str | None = None
    reader_lm_weight: float = 0.0
    reader_lm_context: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        from speechlm.adapters.projectors import PROJECTORS  # the registry lives beside the modules

        problems = ConfigProblems()
        if self.projector_type not in PROJECTORS:
            problems.append(f"projector_config.projector_type={self.projector_type!r}: "
                            f"choose one of {sorted(PROJECTORS)}")
        if self.stack_factor < 1:
            problems.append(f"projector_config.stack_factor={self.stack_factor}: must be >= 1")
        if self.hidden_size < 1:
            problems.append(f"projector_config.hidden_size={self.hidden_size}: must be >= 1")
        if self.compression not in COMPRESSIONS:
            problems.append(f"projector_config.compression={self.compression!r}: choose one of {list(COMPRESSIONS)}")
        if self.reader not in READERS:
            problems.append(f"projector_config.reader={self.reader!r}: choose one of {list(READERS)}")
        elif self.reader != "none" and self.compression != "none":
            problems.append(f"projector_config.reader={self.reader!r} reads the whole clip beside its frames; "
                            f"it does not combine with compression={self.compression!r} (set compression: none)")
        if not 1 <= self.reader_tokens_per_second <= 100:
            problems.append(f"projector_config.reader_tokens_per_second={self.reader_tokens_per_second}: must be "
                            f"in [1, 100] (speech has ~3-5 tokens a second)")
        if not 0 <= self.reader_silence_seconds <= 30:
            problems.append(f"projector_config.reader_silence_seconds={self.reader_silence_seconds}: must be in "
                            f"[0, 30] (Whisper's input is at most 30 s)")
        if self.reader_beam_size < 1:
            problems.append(f"projector_config.reader_beam_size={self.reader_beam_size}: must be >= 1 (1: greedy)")
        if self.reader_prompt is not None and not (isinstance(self.reader_prompt, str) and self.reader_prompt.strip()):
            problems.append(f"projector_config.reader_prompt={self.reader_prompt!r}: expected text (the words Whisper "
                            f"should spell as given) or null")
        if self.reader_lm_context is not None and not (isinstance(self.reader_lm_context, str)
                                                       and self.reader_lm_context.strip()):
            problems.append(f"projector_config.reader_lm_context={self.reader_lm_context!r}: expected text (what "
                            f"the backbone reads before each transcript it ranks) or null")
        if not self.reader_lm_weight >= 0:
            problems.append(f"projector_config.reader_lm_weight={self.reader_lm_weight}: must be >= 0 (0: Whisper "
                            f"ranks its beam alone)")
        problems.raise_if_any("SpeechLMProjectorConfig")

    @property
    def reader_slots_per_second(self) -> int:
        """LM positions a second of audio gets for the reader's transcript (0 without a reader)."""
        return self.reader_tokens_per_second if self.reader != "none" else 0


@strict
class SpeechLMConfig(PreTrainedConfig):
    r"""Configuration of a [`SpeechLMForCausalLM`].

    Args:
        text_config: the backbone's own config (any HF causal LM; Llama by default).
        audio_config: Whisper encoder dimensions ([`SpeechLMAudioConfig`]).
        projector_config: the projector variant and its sizes ([`SpeechLMProjectorConfig`]).
        num_speech_units: codes in the codec's first RVQ layer (1024 for SpeechTokenizer).
        text_vocab_size: id of the first added token. It equals the tokenizer's length before expansion,
            which may be smaller than ``text_config.vocab_size`` (padded embedding matrices).
        audio_token_id / speech_start_token_id / speech_end_token_id / speech_unit_start_id: the ids of
            ``<|audio|>``, ``<|speech_start|>``, ``<|speech_end|>`` and ``<|s_0|>``, derived from
            ``text_vocab_size`` and recorded so that a reload can check the tokenizer against them.
        mode: how the backbone trains: ``frozen``, ``lora``, ``qlora`` (4-bit NF4 + LoRA) or ``full``.
        lora_config: peft ``LoraConfig`` settings for lora and qlora (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ``use_rslora``, ``use_dora``, ...; ``task_type`` is always CAUSAL_LM), over
            ``LORA_DEFAULTS``. A config saved with the flat ``lora_r``/``lora_alpha``/... keys loads into it.
        lora_scope: LoRA acts on ``all`` positions, on every position of a row with ``<|audio|>``
            (``audio``), on those and the speech tokens of any row (``speech``), or on a clip's own positions
            only (``clip``: its frames and transcript; the request's text and the answer run the base weights);
            gated, text runs the base backbone exactly (`speechlm.adapters.lora_gate`).
        train_audio_encoder: also train the Whisper encoder (it is frozen by default).
        audio_encoder_dtype: what the Whisper encoder computes in: ``float32``, or ``bfloat16`` (autocast, where the
            device has native bfloat16; float32 elsewhere): half a CPU's encoding time, and Whisper's transcripts
            of 241 of the quick start's 245 held-out clips the same (BENCHMARKS.md). Saved with the model, so a
            clip reads the same in training and after.
        speech_units_per_character: the speaking rate of the speech the model learned to produce (speech units
            per character of the text spoken, fit on its training pairs by the recipe); generation keeps a
            speech span between ``1 - speech_length_tolerance`` and ``speech_length_ceiling`` times the length
            it implies. None: the LM alone decides where speech ends.
        speech_length_tolerance: how much shorter than that length a span may end (0.25: from 75% of it).
        speech_length_ceiling: where a span ends at the latest, times that length (1.0: at the length itself;
            a model trained on a few hours rarely ends a span on its own, so most end here).
        text_model_name_or_path / audio_model_name_or_path: where the base weights come from. When set
            and the backbone is not fully tuned, checkpoints hold only what was trained.
    """

    model_type = "speechlm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "audio_config": SubConfigSpec(config_class=SpeechLMAudioConfig),
        "projector_config": SubConfigSpec(config_class=SpeechLMProjectorConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    projector_config: dict | PreTrainedConfig | None = None
    num_speech_units: int = 1024
    text_vocab_size: int | None = None
    audio_token_id: int | None = None
    speech_start_token_id: int | None = None
    speech_end_token_id: int | None = None
    speech_unit_start_id: int | None = None
    mode: str = "frozen"
    lora_config: dict | None = None
    lora_scope: str = "all"
    train_audio_encoder: bool = False
    audio_encoder_dtype: str = "float32"
    speech_units_per_character: float | None = None
    speech_length_tolerance: float = 0.25
    speech_length_ceiling: float = 1.0
    text_model_name_or_path: str | None = None
    audio_model_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.dtype, str) and self.dtype != "auto" and not isinstance(getattr(torch, self.dtype, None),
                                                                                   torch.dtype):
            # transformers would fail on getattr(torch, ...) with an AttributeError that names no setting
            raise ValueError(f"dtype={self.dtype!r}: not a torch dtype; expected 'auto', a name such as "
                             f"'bfloat16' or 'float32', or a torch.dtype")
        flat_lora = {FLAT_LORA_KEYS[name]: kwargs.pop(name) for name in list(kwargs) if name in FLAT_LORA_KEYS}
        self.lora_config = {**LORA_DEFAULTS, **flat_lora, **(self.lora_config or {})}
        super().__post_init__(**kwargs)
        if self.text_vocab_size is None:
            self.text_vocab_size = self.text_config.vocab_size
        expected = self.expected_token_ids()
        problems = self._setting_problems()
        for name, value in expected.items():
            current = getattr(self, name)
            if current is None:
                setattr(self, name, value)
            elif current != value:
                problems.append(f"{name}={current} disagrees with text_vocab_size={self.text_vocab_size}, "
                                f"which puts it at {value}")
        problems.raise_if_any("SpeechLMConfig")

    def check_settings(self) -> None:
        """Raise `ConfigError` naming every bad setting: for settings changed after the config was made
        (a stage that switches the training mode)."""
        self._setting_problems().raise_if_any("SpeechLMConfig")

    def _setting_problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        if self.mode not in TRAINING_MODES:
            problems.append(f"mode={self.mode!r}: choose one of {list(TRAINING_MODES)}")
        if self.num_speech_units < 1:
            problems.append(f"num_speech_units={self.num_speech_units}: must be >= 1")
        if not 1 <= self.text_vocab_size <= self.text_config.vocab_size:
            problems.append(f"text_vocab_size={self.text_vocab_size}: must be in [1, text_config.vocab_size="
                            f"{self.text_config.vocab_size}] (the tokenizer has more tokens than the LM embeds)")
        audio = self.audio_config
        if self.projector_config.reader == "whisper":
            if audio.n_text_state != audio.n_audio_state:
                problems.append(f"audio_config.n_text_state={audio.n_text_state}: the whisper reader's decoder "
                                f"attends to the encoder's frames, so it must equal n_audio_state={audio.n_audio_state}")
            if audio.n_vocab < 51864:
                problems.append(f"audio_config.n_vocab={audio.n_vocab}: the whisper reader decodes with Whisper's "
                                f"tokenizer, which has 51864 (English) or >= 51865 (multilingual) tokens")
        if self.audio_encoder_dtype not in ENCODER_DTYPES:
            problems.append(f"audio_encoder_dtype={self.audio_encoder_dtype!r}: choose one of {list(ENCODER_DTYPES)}")
        if self.speech_units_per_character is not None and not self.speech_units_per_character > 0:
            problems.append(f"speech_units_per_character={self.speech_units_per_character}: must be > 0 (or null)")
        if not 0.0 <= self.speech_length_tolerance < 1.0:
            problems.append(f"speech_length_tolerance={self.speech_length_tolerance}: must be in [0, 1)")
        if not self.speech_length_ceiling > 1.0 - self.speech_length_tolerance:
            problems.append(f"speech_length_ceiling={self.speech_length_ceiling}: must be above 1 - "
                            f"speech_length_tolerance = {1.0 - self.speech_length_tolerance:g}")
        problems.extend(lora_problems(self.lora_config))
        if self.lora_scope not in LORA_SCOPES:
            problems.append(f"lora_scope={self.lora_scope!r}: choose one of {list(LORA_SCOPES)}")
        elif self.lora_scope != "all" and self.mode not in ("lora", "qlora"):
            problems.append(f"lora_scope={self.lora_scope!r} gates LoRA, which mode={self.mode!r} has none of: use mode "
                            f"lora or qlora")
        return problems

    def expected_token_ids(self) -> dict[str, int]:
        """The added-token ids implied by ``text_vocab_size`` (layout in ``speech_io.units``)."""
        return speech_token_ids(self.text_vocab_size)

    @property
    def num_added_tokens(self) -> int:
        return len(SPECIAL_SPEECH_TOKENS) + self.num_speech_units

    @property
    def vocab_size(self) -> int:
        """Rows of the fused vocabulary: the backbone's text tokens, then the added speech tokens."""
        return self.text_vocab_size + self.num_added_tokens

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def saves_adapter_only(self) -> bool:
        """Checkpoints hold only trained weights when the backbone can be re-read from its source."""
        return self.text_model_name_or_path is not None and self.mode != "full"


def lora_problems(lora: dict, where: str = "lora_config") -> list[str]:
    """What is wrong with peft ``LoraConfig`` settings that can be told without peft (its own check of the
    keys runs where the adapters are made: `speechlm.adapters.modes.lora_config`)."""
    problems = []
    rank = lora.get("r", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"{where}.r={rank!r}: must be an integer >= 1")
    dropout = lora.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        problems.append(f"{where}.lora_dropout={dropout!r}: must be in [0, 1)")
    if "task_type" in lora:
        problems.append(f"{where}.task_type: speechlm sets it (CAUSAL_LM); leave it out")
    return problems
