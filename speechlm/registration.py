"""The one place where speechlm registers itself with transformers (run by ``import speechlm``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from speechlm.adapters.configuration import SpeechLMConfig
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.pipeline import SpeechLMPipeline
from speechlm.speech_io.processor import SpeechLMProcessor

PIPELINE_TASK = "speechlm"


def register() -> None:
    """Make ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoProcessor`` resolve ``model_type="speechlm"``,
    and ``pipeline("speechlm", ...)`` build a `SpeechLMPipeline`. Idempotent."""
    AutoConfig.register(SpeechLMConfig.model_type, SpeechLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(SpeechLMConfig, SpeechLMForCausalLM, exist_ok=True)
    AutoProcessor.register(SpeechLMConfig, SpeechLMProcessor, exist_ok=True)
    PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=SpeechLMPipeline,
                                        pt_model=AutoModelForCausalLM, type="multimodal")
