"""`SpeechLMForCausalLM`: Whisper encoder -> projector -> embeddings spliced into a causal LM at ``<|audio|>``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from speechlm.adapters.audio_encoder import (
    WhisperAudioEncoder,
    encoder_precision,
    native_bfloat16,
    warn_float32_fallback,
)
from speechlm.adapters.compression import CTCCompressor
from speechlm.adapters.configuration import SpeechLMConfig
from speechlm.adapters.loading import load_speechlm
from speechlm.adapters.lora_gate import SpeechGate
from speechlm.adapters.projectors import build_projector
from speechlm.adapters.readers import WhisperTranscriptReader
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.adapters.text_scoring import UserTextScorer
from speechlm.adapters.vocabulary import SpeechVocabulary
from speechlm.speech_io.constants import (
    IGNORE_INDEX,
    audio_placeholder_count,
    encoder_frames,
    reader_slot_count,
)


def drop_masked_positions(attention_mask: torch.Tensor, labels: torch.Tensor,
                          *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Each row's attended positions moved to its front, in order, and the batch cut to its longest row:
    the new attention mask, ``labels`` (-100 on the new padding) and each ``B, L, ...`` tensor, gathered
    alike. The causal-LM loss is unchanged where no masked position precedes a labelled one (the dropped
    frames of audio inside a prompt, batch padding)."""
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, : int(lengths.max())]
    kept = torch.arange(order.shape[1], device=order.device) < lengths[:, None]
    gathered = [tensor.gather(1, order.view(*order.shape, *[1] * (tensor.dim() - 2)).expand(
        *order.shape, *tensor.shape[2:])) for tensor in tensors]
    return kept.to(attention_mask.dtype), labels.gather(1, order).masked_fill(~kept, IGNORE_INDEX), gathered


@dataclass(frozen=True)
class LMInputs:
    """What the backbone runs on once the audio is in: ``B, L, D`` embeddings, ``B, L`` attention mask and
    position ids (None: the backbone counts them), ``B, L`` labels (None: no loss)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.LongTensor | None
    labels: torch.LongTensor | None


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ResidualAttentionBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only our own modules: the backbone initialises itself and the Whisper encoder comes with
        # openai-whisper's init (or its checkpoint). SpeechVocabulary rows are set by `initialize_from`.
        if isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "_speechlm_owned", False):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class SpeechLMForCausalLM(SpeechLMPreTrainedModel, GenerationMixin):
    """A causal LM that hears (continuous Whisper features at ``<|audio|>``) and speaks (unit tokens).

    Parts, named as checkpoint keys: ``audio_tower`` (openai-whisper ``AudioEncoder``),
    ``multi_modal_projector``, ``language_model`` (any HF causal LM; a peft model in lora/qlora modes,
    whose LoRA ``lora_gate`` confines to speech with ``lora_scope`` "audio" or "speech")
    and ``speech_vocab`` (rows of the added tokens); with ``projector_config.compression="ctc"`` also
    ``audio_compressor`` (the CTC pre-alignment's blank and vocabulary, and the two terms the LM stage
    trains); with ``projector_config.reader="whisper"`` also ``audio_reader`` (Whisper's own decoder, whose
    transcript of each clip follows its frames).
    """

    def __init__(self, config: SpeechLMConfig, *, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.audio_tower = WhisperAudioEncoder(config.audio_config)
        projector = config.projector_config
        self.multi_modal_projector = build_projector(
            projector.projector_type, config.audio_config.n_audio_state, config.text_config.hidden_size,
            stack_factor=projector.stack_factor, hidden_size=projector.hidden_size)
        self.audio_compressor = (CTCCompressor(config.text_config.hidden_size, config.text_vocab_size)
                                 if projector.compression == "ctc" else None)
        self.audio_reader = (WhisperTranscriptReader(config.audio_config, projector)
                             if projector.reader == "whisper" else None)
        # What the frozen encoder and reader made of each clip, for training's epochs and evaluations: off
        # here (a served model sees each clip once, and would keep them all), on in the training recipe.
        self.reading_cache = ReadingCache(max_bytes=0)
        self._call_readings = ReadingCache()  # `keeping_readings`' (emptied after each call; the weights'
                                              # fingerprint, a hash of every parameter, is kept)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        elif language_model.config._attn_implementation is None:
            # Wrapping the backbone's config in a SpeechLMConfig reset its attention choice (the setter
            # recurses into sub-configs); give the backbone back the one this model resolved.
            language_model.config._attn_implementation = self.config._attn_implementation
        self.language_model = language_model
        self.speech_vocab = SpeechVocabulary(config.text_vocab_size, config.num_added_tokens,
                                             config.text_config.hidden_size)
        self.lora_gate: SpeechGate | None = None  # lora_scope audio|speech: set by apply_training_mode
        for module in (*self.multi_modal_projector.modules(), *self.speech_vocab.modules()):
            module._speechlm_owned = True
        self.post_init()

    # -- the backbone, whether or not peft wraps it -------------------------------------------------------
    @property
    def text_model(self) -> PreTrainedModel:
        """The backbone ``*ForCausalLM`` itself (unwrapped from peft; LoRA layers stay injected)."""
        model = self.language_model
        # looked up on the class: an instance lookup falls through nn.Module.__getattr__ on every step
        return model.get_base_model() if hasattr(type(model), "get_base_model") else model

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.text_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.text_model.get_decoder()

    @contextmanager
    def language_model_in(self, dtype: torch.dtype | str | None) -> Iterator[None]:
        """While inside, the LM's weights (the backbone, its LoRA and the speech-unit rows) are ``dtype``;
        after, the very tensors they were. bfloat16 halves the bytes a decoding step reads: generating, a
        small LM is bound by them (BENCHMARKS.md). The audio side keeps its dtype, and so do buffers (the
        rotary frequencies lose positions in bfloat16). None changes nothing, and so does bfloat16 on a
        device without native bfloat16 (slower there than float32; it warns)."""
        asked = dtype
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if asked is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"language_model_in({asked!r}): expected a floating torch dtype or its name "
                             "(bfloat16, float16, float32)")
        if dtype == torch.bfloat16 and not native_bfloat16(self.device.type):
            warn_float32_fallback("the language model in bfloat16", "it", self.device.type)
            dtype = None
        if dtype is None:
            yield
            return
        parameters = [p for part in (self.language_model, self.speech_vocab) for p in part.parameters()
                      if p.is_floating_point() and p.dtype != dtype]
        originals = [p.data for p in parameters]
        try:
            for parameter in parameters:
                parameter.data = parameter.data.to(dtype)
            yield
        finally:
            for parameter, original in zip(parameters, originals, strict=True):
                parameter.data = original

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        try:
            return self.speech_vocab.embed(input_ids, self.get_input_embeddings(),
                                           always=self._every_part_needs_a_gradient())
        except IndexError as error:  # checked here, not up front: a range check costs every decoding step
            vocab_size = self.config.vocab_size
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
            if not bad.numel():
                raise
            raise ValueError(f"input_ids contain {bad[0].item()}, outside this model's vocabulary [0, "
                             f"{vocab_size}); was it tokenized with this model's tokenizer?") from error

    # -- audio ---------------------------------------------------------------------------------------
    def set_text_tokenizer(self, tokenizer) -> None:
        """The backbone's tokenizer, for a reader that hands the LM text (`load_speechlm` and
        `build_speechlm` call this); a model without a reader needs none."""
        if self.audio_reader is not None:
            context = self.config.projector_config.reader_lm_context
            self.audio_reader.set_text_tokenizer(tokenizer, UserTextScorer(self, tokenizer, context=context))

    @property
    def masks_audio_positions(self) -> bool:
        """Whether some ``<|audio|>`` positions stay empty and leave the attention mask (frames CTC
        compression drops, a reader's unused transcript slots)."""
        return self.audio_compressor is not None or self.audio_reader is not None

    def audio_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """``<|audio|>`` positions for each clip of ``mel_lengths`` mel frames: its projected frames, then
        the reader's transcript slots."""
        projector = self.config.projector_config
        return audio_placeholder_count(mel_lengths, projector.stack_factor, projector.reader_slots_per_second)

    def get_audio_features(self, input_features: torch.Tensor,
                           input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``N, n_mels, T`` log-mel of N clips -> ``sum_i L_i, D``: each clip's ``<|audio|>`` embeddings, in
        order, padding dropped (``L_i = audio_lengths(mel frames of clip i)``); with CTC compression, the
        frames it drops are zero, with a reader the transcript slots it leaves empty."""
        return self._audio_embeddings(input_features, input_features_mask)[0]

    @torch.no_grad()
    def audio_transcripts(self, input_features: torch.Tensor,
                          input_features_mask: torch.Tensor | None = None) -> list[list[int]]:
        """``N, n_mels, T`` log-mel of N clips -> each clip's transcript by the reader, in the backbone's token
        ids (what the LM gets in the clip's transcript slots)."""
        if self.audio_reader is None:
            raise ValueError("audio_transcripts needs a reader (projector_config.reader: whisper); this model has "
                             f"reader={self.config.projector_config.reader!r}")
        return self._encode_and_read(input_features, self._mel_lengths(input_features, input_features_mask))[1]

    def weights_changed(self) -> None:
        """What was computed from the weights (the readings' fingerprint, the ranking's opening) is computed again:
        after a change torch's version counters do not see, a write through ``.data`` (peft's LoRA merge)."""
        self.reading_cache.weights_changed()
        if self.audio_reader is not None and self.audio_reader.text_scorer is not None:
            self.audio_reader.text_scorer.weights_changed()

    @contextmanager
    def keeping_readings(self) -> Iterator[None]:
        """While inside, what the frozen encoder and reader make of each clip is kept (when the model keeps
        nothing otherwise), so reading a clip's transcript and then generating from it reads it once."""
        if self.reading_cache.max_bytes > 0 or self.config.train_audio_encoder:
            yield
            return
        own, self.reading_cache = self.reading_cache, self._call_readings
        try:
            yield
        finally:
            self._call_readings.clear()
            self.reading_cache = own

    def _audio_embeddings(self, input_features: torch.Tensor,
                          input_features_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`get_audio_features`, and which of them the LM attends to (None: all of them)."""
        mel_lengths = self._mel_lengths(input_features, input_features_mask)
        if self.audio_reader is not None:
            return self._read_audio(input_features, mel_lengths)
        frames, _ = self._encode_and_read(input_features, mel_lengths)
        projected, valid = self._projected_frames(nn.utils.rnn.pad_sequence(frames, batch_first=True), mel_lengths)
        if self.audio_compressor is None:
            return projected[valid], None
        compressed, kept = self.audio_compressor(projected, valid, self.get_input_embeddings().weight)
        return compressed[valid], kept[valid]

    @staticmethod
    def _mel_lengths(input_features: torch.Tensor, input_features_mask: torch.Tensor | None) -> torch.Tensor:
        if input_features_mask is None:
            return torch.full((input_features.shape[0],), input_features.shape[-1], device=input_features.device)
        return input_features_mask.sum(-1)

    def _audio_input(self, input_features: torch.Tensor) -> torch.Tensor:
        return input_features.to(self.audio_tower.conv1.weight.dtype)

    def _projected_frames(self, frames: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``N, T', C`` encoder frames -> ``N, L, D`` projected frames and ``N, L`` which of them are real (the
        rest is batch padding)."""
        # Zero the frames past each clip so its last stacked group is the same alone or in a batch.
        valid_frames = torch.arange(frames.shape[1], device=frames.device) < encoder_frames(mel_lengths)[:, None]
        frames = frames * valid_frames.unsqueeze(-1).to(frames.dtype)
        projected = self.multi_modal_projector(frames)  # N, T/2/S, D
        stacked = audio_placeholder_count(mel_lengths, self.config.projector_config.stack_factor)
        valid = torch.arange(projected.shape[1], device=projected.device) < stacked[:, None]
        return projected, valid

    def _read_audio(self, input_features: torch.Tensor,
                    mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With a reader: each clip's projected frames, then the embeddings of its transcript's tokens in
        its slots (the empty slots are zero and not kept)."""
        frames, token_ids = self._encode_and_read(input_features, mel_lengths)
        padded = nn.utils.rnn.pad_sequence(frames, batch_first=True)  # N, max T'_i, C
        projected, valid = self._projected_frames(padded, mel_lengths)
        slots = reader_slot_count(mel_lengths, self.config.projector_config.reader_slots_per_second)
        embeddings = self.get_input_embeddings()
        pieces, kept = [], []
        for clip, ids in enumerate(token_ids):
            count = int(valid[clip].sum())
            text = embeddings(torch.tensor(ids, dtype=torch.long, device=projected.device)).to(projected.dtype)
            empty = int(slots[clip]) - len(ids)
            pieces += [projected[clip, :count], text, projected.new_zeros(empty, projected.shape[-1])]
            kept.append(torch.cat([torch.ones(count + len(ids), dtype=torch.bool, device=projected.device),
                                   torch.zeros(empty, dtype=torch.bool, device=projected.device)]))
        return torch.cat(pieces), torch.cat(kept)

    def _encode_and_read(self, input_features: torch.Tensor,
                         mel_lengths: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
        """One encoder pass per clip -> each clip's own encoder frames (``T'_i, C``) and, with a reader, its
        transcript in the backbone's vocabulary (the clip padded with silence to the reader's window). A
        frozen encoder's results come from `reading_cache` when the same clip was read before with the same
        weights; it runs in ``config.audio_encoder_dtype`` whatever the autocast, and the reader in float32, so
        that a clip reads the same in training (bf16 autocast) as at inference."""
        reader = self.audio_reader
        cacheable = not self.config.train_audio_encoder and self.reading_cache.max_bytes > 0
        parts = (self.audio_tower,) if reader is None else (self.audio_tower, reader)
        settings = (self.config.audio_encoder_dtype, *(() if reader is None else reader.settings()))
        # a reader that lets the backbone rank its beam reads by the backbone's base weights too
        scorer = reader.text_scorer if reader is not None and reader.rescores else None
        fingerprint = self.reading_cache.fingerprint(
            *parts, settings=settings, tensors=() if scorer is None else scorer.weights()) if cacheable else None
        keys = [self.reading_cache.clip_key(input_features[i, :, : int(mel_lengths[i])]) for i in range(len(mel_lengths))]
        results = [self.reading_cache.get(fingerprint, key) if cacheable else None for key in keys]
        missing = [i for i, result in enumerate(results) if result is None]
        if missing:
            lengths = mel_lengths[missing]
            windows = lengths if reader is None else reader.windows(lengths)
            # A reader's clips are encoded a window at a time, as its decoder reads them: nothing padded to mask (a
            # batch of clips of similar lengths spans a few windows). Without one each clip is its own length.
            groups = ([torch.arange(len(missing))] if reader is None
                      else [(windows == window).nonzero().squeeze(-1) for window in torch.unique(windows)])
            with (torch.no_grad() if cacheable else nullcontext()):
                for group in groups:
                    clips = [missing[row] for row in group.tolist()]
                    frames, token_ids = self._encode_clips(input_features[clips], lengths[group], windows[group])
                    for row, clip in enumerate(clips):
                        results[clip] = (frames[row, : int(encoder_frames(lengths[group][row]))], token_ids[row])
                        if cacheable:
                            self.reading_cache.put(fingerprint, keys[clip], results[clip])
        return [frames for frames, _ in results], [ids for _, ids in results]

    def _encode_clips(self, input_features: torch.Tensor, lengths: torch.Tensor,
                      windows: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """`_encode_and_read`'s work for clips not read before: ``N, T', C`` encoder frames (each clip heard in its
        window: with a reader, followed by silence) and each clip's transcript (``[]`` without a reader)."""
        reader = self.audio_reader
        padded = input_features if reader is None else reader.pad_with_silence(input_features, lengths, windows)
        with torch.autocast(padded.device.type, enabled=False):
            with encoder_precision(self.config.audio_encoder_dtype, padded.device.type):
                frames = self.audio_tower(self._audio_input(padded), windows)
            frames = frames.to(self.audio_tower.conv1.weight.dtype)  # the weights' dtype, as without autocast
            if reader is None:
                return frames, [[] for _ in range(len(lengths))]
            # the transcript too, in float32: under training's bf16 autocast it could differ from inference's
            return frames, reader.token_ids(reader.transcribe(frames.detach(), windows), lengths)

    def merge_audio_embeddings(self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor,
                               audio_embeds: torch.Tensor) -> torch.Tensor:
        placeholders = input_ids == self.config.audio_token_id
        num_placeholders = int(placeholders.sum())
        if num_placeholders != audio_embeds.shape[0]:
            raise ValueError(f"the input has {num_placeholders} <|audio|> placeholder tokens but the audio yields "
                             f"{audio_embeds.shape[0]} embeddings; build inputs with SpeechLMProcessor, which "
                             f"expands each clip to the number its encoder + projector emit")
        mask = placeholders.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, audio_embeds.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                     input_features: torch.Tensor | None = None,
                     input_features_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with each clip's frames at its ``<|audio|>`` placeholders -> (``inputs_embeds``,
        ``attention_mask``). With CTC compression the placeholders of dropped frames leave the attention
        mask (zeros amid the sequence: the sequence keeps its length)."""
        inputs_embeds = self.embed_tokens(input_ids)
        if input_features is None:
            if bool((input_ids == self.config.audio_token_id).any()):
                raise ValueError("the input has <|audio|> placeholder tokens but no input_features were given")
            return inputs_embeds, attention_mask
        audio_embeds, kept = self._audio_embeddings(input_features, input_features_mask)
        inputs_embeds = self.merge_audio_embeddings(input_ids, inputs_embeds, audio_embeds)
        if kept is not None:
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
            placeholders = input_ids == self.config.audio_token_id
            attention_mask[placeholders] = attention_mask[placeholders] * kept.to(attention_mask.dtype)
        return inputs_embeds, attention_mask

    def _every_part_needs_a_gradient(self) -> bool:
        """In distributed training every rank must produce a gradient for every trainable parameter in
        every step: ZeRO fills its reduction buckets in arrival order, so a rank whose batch has no audio
        (or no speech tokens) would otherwise run mismatched collectives."""
        return self.training and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _unused_audio_parts(self) -> torch.Tensor:
        """A zero that depends on every trainable audio parameter (a tiny silent clip through them)."""
        stack = self.config.projector_config.stack_factor
        if self.config.train_audio_encoder:
            silence = torch.zeros(1, self.config.audio_config.n_mels, 2 * stack, device=self.device,
                                  dtype=self.audio_tower.conv1.weight.dtype)
            frames = self.audio_tower(silence)
        else:
            frames = torch.zeros(1, stack, self.config.audio_config.n_audio_state, device=self.device,
                                 dtype=self.multi_modal_projector.linear_1.weight.dtype)
        zero = self.multi_modal_projector(frames).sum() * 0.0
        if self.audio_compressor is not None:
            zero = zero + sum(param.sum() for param in self.audio_compressor.parameters()) * 0.0
        return zero

    # -- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_features: ``N, n_mels, T`` log-mel of the N clips in the batch, in the order their
            ``<|audio|>`` spans appear (row-major over the batch).
        input_features_mask: ``N, T``, 1 for real mel frames, 0 for padding.
        labels: ``B, L`` token ids to predict, -100 where no loss is taken (shifted inside).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_features is not None and input_ids is None:
            raise ValueError("input_features need input_ids to locate the <|audio|> placeholders")
        if self.lora_gate is not None:
            self.lora_gate.set_positions(input_ids, (input_ids if inputs_embeds is None else inputs_embeds).shape[0])
        lm = self._lm_inputs(input_ids, inputs_embeds, attention_mask, position_ids, labels, input_features,
                             input_features_mask, loss_only="shift_labels" not in kwargs)
        with self._lora_bypass():
            outputs = self.get_decoder()(inputs_embeds=lm.inputs_embeds, attention_mask=lm.attention_mask,
                                         position_ids=lm.position_ids, cache=cache, use_cache=use_cache, **kwargs)
        if lm.labels is not None and self.training:
            return self._labelled_loss(outputs.last_hidden_state, lm.labels, outputs, **kwargs)
        return self._logits_output(outputs, lm.labels, logits_to_keep, **kwargs)

    def _lm_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, labels, input_features,
                   input_features_mask, *, loss_only: bool) -> LMInputs:
        """What the backbone runs on. Audio: each clip's embeddings at its placeholders, and where some
        placeholders stay empty (`masks_audio_positions`) they leave the attention mask and take no position
        id, so the LM sees the kept ones as adjacent tokens; a training step that needs only the loss cuts
        them out of the batch. A distributed training batch without audio adds a zero that reaches every
        trainable audio parameter (`_every_part_needs_a_gradient`)."""
        if inputs_embeds is None:
            inputs_embeds, attention_mask = self.embed_inputs(input_ids, attention_mask, input_features,
                                                              input_features_mask)
            if self.masks_audio_positions and input_features is not None and position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                if labels is not None and self.training and loss_only:
                    return self._cut_dropped_frames(LMInputs(inputs_embeds, attention_mask, position_ids, labels))
        if input_features is None and self._every_part_needs_a_gradient():
            inputs_embeds = inputs_embeds + self._unused_audio_parts()
        return LMInputs(inputs_embeds, attention_mask, position_ids, labels)

    def _cut_dropped_frames(self, lm: LMInputs) -> LMInputs:
        """Training returns only the loss: the LM need not run over the frames CTC compression dropped at
        all (`drop_masked_positions`; the LoRA gate is cut alike)."""
        gate = self.lora_gate
        gated = [] if gate is None else [gate.positions]
        attention_mask, labels, (inputs_embeds, position_ids, *gated) = drop_masked_positions(
            lm.attention_mask, lm.labels, lm.inputs_embeds, lm.position_ids, *gated)
        if gate is not None:
            gate.positions = gated[0]
        return LMInputs(inputs_embeds, attention_mask, position_ids, labels)

    def _lora_bypass(self):
        """Nothing to adapt (a text request under a speech-gated LoRA): skip LoRA's compute as well.
        Training keeps it, so that every LoRA parameter gets a (zero) gradient in every step."""
        if self.lora_gate is None or self.training:
            return nullcontext()
        return self.lora_gate.skipped_if_closed()

    def _logits_output(self, outputs, labels: torch.LongTensor | None, logits_to_keep: int | torch.Tensor,
                       **kwargs) -> CausalLMOutputWithPast:
        """Logits over the whole vocabulary at the positions ``logits_to_keep`` asks for (0: all), and the
        loss over them when there are labels (evaluation; training takes `_labelled_loss`)."""
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.speech_vocab.logits(hidden_states, self.get_output_embeddings())
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _labelled_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor, outputs,
                       **kwargs) -> CausalLMOutputWithPast:
        """Training: the head only at positions that have a label. The head is the largest matrix a small
        backbone has (SmolLM2: 49k x 576, a fifth of its weights) and a sample labels few of its tokens
        (ASR: the transcript, not the audio and prompt), so this is much of a step. The loss is the same
        as over full logits; the output's ``logits`` are those at the labelled positions only (``N_labelled,
        V``, row by row), for a loss of the caller's own (`speechlm.finetune.behaviour`)."""
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        labelled = shift_labels != IGNORE_INDEX
        logits = self.speech_vocab.logits(hidden_states[labelled], self.get_output_embeddings())
        loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels[labelled],
                                  vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None,
                 **kwargs):
        """``GenerationMixin.generate``; with CTC compression the audio is embedded first, so that the
        attention mask ``generate`` carries on (and the position ids it counts from it) skip the dropped
        frames. The output is laid out as without compression: the prompt's ids, then the new tokens.
        With a gated ``lora_scope`` the prompt's rows decide where LoRA acts at every decoding step."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if input_features is None or not self.masks_audio_positions:
            if input_features is not None:
                kwargs.update(input_features=input_features, input_features_mask=input_features_mask)
        elif input_ids is None:
            raise ValueError("input_features need input_ids to locate the <|audio|> placeholders")
        else:
            kwargs["inputs_embeds"], kwargs["attention_mask"] = self.embed_inputs(
                input_ids, attention_mask, input_features, input_features_mask)
        if self.lora_gate is None:
            return super().generate(**kwargs)
        with self.lora_gate.hold(input_ids):
            return super().generate(**kwargs)

    # -- reporting -------------------------------------------------------------------------------------
    def parameter_counts(self) -> ParameterCounts:
        """Trainable and total parameters (4-bit weights counted as their unpacked element count)."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
            total += count
            trainable += count if param.requires_grad else 0
        return ParameterCounts(trainable, total)

    # -- checkpoints -----------------------------------------------------------------------------------
    def is_checkpoint_key(self, key: str) -> bool:
        """Whether a checkpoint holds this state-dict entry. Parts that can be re-read from their source
        (``text_model_name_or_path``, ``audio_model_name_or_path``) and did not train are left out."""
        config = self.config
        if key.startswith("language_model."):
            return not config.saves_adapter_only or "lora_" in key
        if key.startswith("audio_tower."):
            return config.audio_model_name_or_path is None or config.train_audio_encoder
        if key.startswith("audio_reader."):
            return config.audio_model_name_or_path is None
        return True

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """Safetensors with only what `is_checkpoint_key` keeps: a few MB for a frozen or LoRA-tuned
        backbone that names its source, everything for a standalone model."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {key: value for key, value in state_dict.items() if self.is_checkpoint_key(key)}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> SpeechLMForCausalLM:
        """Reassemble a saved SpeechLM: base parts from their sources, then the saved weights on top.
        Keyword arguments: ``dtype``, ``mode`` (e.g. ``"lora"`` to load a QLoRA checkpoint in full
        precision), ``device_map``/``revision``/``token`` as usual; see `load_speechlm`, which refuses the
        keywords it would not honour."""
        if model_args:
            raise TypeError(f"SpeechLMForCausalLM.from_pretrained takes no positional model arguments, got {model_args}")
        # what the Auto classes add on their way here: settled before (trust_remote_code) or unused
        kwargs.pop("_from_auto", None)
        kwargs.pop("trust_remote_code", None)
        if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):  # Auto found adapter_config.json
            raise TypeError(f"{pretrained_model_name_or_path}: a SpeechLM checkpoint carries its LoRA in "
                            f"model.safetensors; a separate peft adapter (adapter_config.json) is not loaded")
        return load_speechlm(cls, pretrained_model_name_or_path, **kwargs)
