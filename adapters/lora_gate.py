"""Speech-gated LoRA (``lora_scope`` ``"audio"``, ``"speech"`` or ``"clip"``): the backbone's LoRA acts on speech only.

With ``"audio"`` LoRA changes every position of a row that hears audio (an ``<|audio|>`` placeholder in its
input); ``"speech"`` adds the speech tokens of any row (``<|speech_start|>``, units, ``<|speech_end|>``);
``"clip"`` confines it to the clip's own positions (its frames and, with a reader, its transcript), so the
layers learn how to read a clip and everything after it (the request's text, the answer) runs the base
weights: a spoken request is answered by the backbone itself from what it heard. Every other position (a
text prompt and its text answer) runs the base weights exactly, so the backbone's text answers stay what
they were while the layers learn to listen (and to speak). Whether a position is gated on depends only on
its row's prompt and its own token, so training and decoding (one token a step, any beam order) agree.

peft's per-row ``adapter_names`` selects adapters at inference only (it refuses training mode); here a
forward hook on every ``lora_B`` multiplies its output by the gate, 1 or 0. A gated-off position adds an
exact zero, and every LoRA parameter stays in the graph of every batch (a zero gradient where nothing is
speech), as ZeRO requires of each rank.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from speechlm.adapters.configuration import LORA_SCOPES

GATED_SCOPES = tuple(scope for scope in LORA_SCOPES if scope != "all")


class SpeechGate:
    """Where LoRA acts in the batch in flight; set by `SpeechLMForCausalLM` from its ``input_ids``.

    The gate stays set after a forward (gradient checkpointing recomputes the layers in the backward
    pass, after the forward returned). ``generate`` holds the prompt's rows over all its decoding steps,
    whose inputs are the new tokens alone (or, first, the prompt's embeddings). Before any forward
    (``positions is None``) LoRA acts everywhere.
    """

    def __init__(self, audio_token_id: int, scope: str):
        if scope not in GATED_SCOPES:
            raise ValueError(f"scope={scope!r}: a gate is one of {list(GATED_SCOPES)}")
        self.audio_token_id = audio_token_id  # the added speech tokens follow it
        self.scope = scope
        self.positions: torch.Tensor | None = None  # B, T
        self._scales: tuple[torch.Tensor | None, dict] = (None, {})  # positions as layer outputs multiply them
        self._audio_rows: torch.Tensor | None = None  # B, held by generate
        self._prompt: torch.Tensor | None = None  # B, T of the prompt, for generate's first forward
        self._hooks = []
        self._layers = []  # the peft LoRA layers hooked

    def attach(self, backbone: nn.Module) -> None:
        """Hook the ``lora_B`` projections of every peft LoRA layer in ``backbone`` (once)."""
        if self._hooks:
            return
        from peft.tuners.lora import LoraLayer

        for name, module in backbone.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if not module.lora_B or module.lora_variant:
                # Embedding LoRA keeps its factors as parameters, DoRA and other variants compute their own
                # update: neither passes through a lora_B module that a hook could scale.
                raise ValueError(f"lora_scope gates plain LoRA on linear layers; {name} "
                                 f"({type(module).__name__}) is not one: leave it out of lora target_modules")
            self._hooks += [lora_b.register_forward_hook(self._scale) for lora_b in module.lora_B.values()]
            self._layers.append(module)
        if not self._hooks:
            raise ValueError("the lora_scope gate found no LoRA layers in the backbone")

    def _gate(self, input_ids: torch.Tensor, audio_rows: torch.Tensor) -> torch.Tensor:
        if self.scope == "clip":  # a decoding step's new token is never a clip's: the base weights answer
            return input_ids == self.audio_token_id
        if audio_rows.shape[0] != input_ids.shape[0]:  # generate repeats each prompt for beams and samples
            audio_rows = audio_rows.repeat_interleave(input_ids.shape[0] // audio_rows.shape[0])
        if self.scope == "audio":
            return audio_rows[:, None].expand(input_ids.shape)
        return audio_rows[:, None] | (input_ids > self.audio_token_id)

    def set_positions(self, input_ids: torch.Tensor | None, batch_size: int) -> None:
        """The gate of a forward pass over ``input_ids`` (inside ``generate``: a chunk of its sequence) or,
        without them, over ``batch_size`` rows of the held prompt's embeddings."""
        prompt, self._prompt = self._prompt, None
        if input_ids is None and prompt is not None:  # generate's first forward, over the prompt's embeddings
            # generate repeats each prompt for beams and samples
            self.positions = prompt.repeat_interleave(batch_size // prompt.shape[0], dim=0)
            return
        if input_ids is None:
            raise ValueError("with a gated lora_scope pass input_ids (not inputs_embeds alone): they say where "
                             "LoRA acts (rows that hold <|audio|>, speech tokens)")
        audio_rows = (input_ids == self.audio_token_id).any(-1) if self._audio_rows is None else self._audio_rows
        self.positions = self._gate(input_ids, audio_rows)

    @contextmanager
    def hold(self, input_ids: torch.Tensor | None):
        """Gate every forward inside by the rows of the prompt ``input_ids``, then restore the gate."""
        if self._audio_rows is not None:  # generate within generate (e.g. assisted decoding): the outer decides
            yield
            return
        if input_ids is None:
            raise ValueError("with a gated lora_scope generate needs input_ids, which say the rows that hear audio")
        previous = self.positions
        self._audio_rows = (input_ids == self.audio_token_id).any(-1)
        self._prompt = self._gate(input_ids, self._audio_rows)
        try:
            yield
        finally:
            self._audio_rows = self._prompt = None
            self.positions = previous

    @contextmanager
    def skipped_if_closed(self):
        """Inside, a forward whose gate is closed everywhere (a text request at inference) skips LoRA's
        compute, whose gated output would be zero. Flips each layer's own off switch, which its forward
        reads (peft's ``disable_adapter()`` walks the whole model twice per call: a quarter of a decoding
        step of SmolLM2-135M); layers that were already off stay off."""
        if self.positions is None or bool(self.positions.any()):
            yield
            return
        layers = [layer for layer in self._layers if not layer.disable_adapters]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False

    def _scale(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        gate = self.positions
        if gate is None:
            return output
        if gate.shape != output.shape[:2]:
            raise RuntimeError(f"the LoRA gate covers {tuple(gate.shape)} positions but a layer saw "
                               f"{tuple(output.shape[:2])}; call the backbone through SpeechLMForCausalLM, "
                               f"which sets the gate")
        if self._scales[0] is not gate:  # made once per forward pass, not in each of its LoRA layers
            self._scales = (gate, {})
        key = (output.device, output.dtype)
        scales = self._scales[1]
        if key not in scales:
            scales[key] = gate.unsqueeze(-1).to(device=output.device, dtype=output.dtype)
        return output * scales[key]
