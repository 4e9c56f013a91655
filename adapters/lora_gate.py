"""Audio-gated LoRA (``lora_scope="audio"``): the backbone's LoRA changes only the rows that hear audio.

A row of a batch whose input has an ``<|audio|>`` placeholder runs the adapted layers; every other row
(a text prompt, a text-to-speech request) runs the base weights exactly, so the backbone's text answers
stay what they were while the layers learn to listen. peft's per-row ``adapter_names`` selects adapters
at inference only (it refuses training mode); here a forward hook on every ``lora_B`` multiplies its
output by the row's gate, 1 or 0. A gated-off row adds an exact zero, and every LoRA parameter stays in
the graph of every batch (a zero gradient where no row hears audio), as ZeRO requires of each rank.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class AudioRowGate:
    """Which rows of the batch in flight get LoRA; set by `SpeechLMForCausalLM` from its ``input_ids``.

    ``rows`` stays set after a forward (gradient checkpointing recomputes the layers in the backward
    pass, after the forward returned); ``generate`` holds the prompt's rows over all its decoding steps,
    whose inputs are the new tokens alone. Before any forward (``rows is None``) LoRA applies to every row.
    """

    def __init__(self, audio_token_id: int):
        self.audio_token_id = audio_token_id
        self.rows: torch.Tensor | None = None
        self._held = False
        self._hooks = []

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
                raise ValueError(f"lora_scope='audio' gates plain LoRA on linear layers; {name} "
                                 f"({type(module).__name__}) is not one: leave it out of lora target_modules")
            self._hooks += [lora_b.register_forward_hook(self._scale) for lora_b in module.lora_B.values()]
        if not self._hooks:
            raise ValueError("lora_scope='audio' found no LoRA layers in the backbone")

    def set_rows(self, input_ids: torch.Tensor | None) -> None:
        """The gate of a forward pass: rows with ``<|audio|>`` in ``input_ids`` (unchanged while held)."""
        if self._held:
            return
        if input_ids is None:
            raise ValueError("with lora_scope='audio' pass input_ids (not inputs_embeds alone): LoRA applies "
                             "to the rows whose input_ids hold <|audio|>")
        self.rows = (input_ids == self.audio_token_id).any(-1)

    @contextmanager
    def hold(self, input_ids: torch.Tensor):
        """Keep the rows of ``input_ids`` (a prompt) for every forward inside, then restore the gate."""
        if self._held:  # generate within generate (e.g. assisted decoding): the outer prompt decides
            yield
            return
        previous = self.rows
        self.set_rows(input_ids)
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.rows = previous

    def _scale(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return output
        batch = output.shape[0]
        if rows.shape[0] != batch:
            # generate repeats each prompt row for beams and num_return_sequences (repeat_interleave)
            if batch % rows.shape[0]:
                raise RuntimeError(f"LoRA gate holds {rows.shape[0]} rows but a layer saw a batch of {batch}; "
                                   f"call the backbone through SpeechLMForCausalLM, which sets the gate")
            rows = rows.repeat_interleave(batch // rows.shape[0])
        return output * rows.to(device=output.device, dtype=output.dtype).view(-1, *[1] * (output.dim() - 1))
