"""The one place where speechlm registers itself with transformers (run by ``import speechlm``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from speechlm.adapters.configuration import SpeechLMConfig
from speechlm.adapters.modeling import SpeechLMForCausalLM


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` resolve ``model_type="speechlm"``. Idempotent."""
    AutoConfig.register(SpeechLMConfig.model_type, SpeechLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(SpeechLMConfig, SpeechLMForCausalLM, exist_ok=True)
