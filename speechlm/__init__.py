"""speechlm: turn Hugging Face Llama-family LLMs into Speech Language Models with adapters.

Importing it registers ``model_type="speechlm"`` with transformers' Auto classes and pipeline
(`speechlm.registration`, which imports the model, processor and pipeline classes). The other public
names load on first use (PEP 562), from the modules `_PUBLIC` names.
"""

from __future__ import annotations

import importlib
from typing import Any

from speechlm.registration import register

register()

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "ModelSpec": "speechlm.adapters.building",
    "build_processor": "speechlm.adapters.building",
    "build_speechlm": "speechlm.adapters.building",
    "SpeechLMAudioConfig": "speechlm.adapters.configuration",
    "SpeechLMConfig": "speechlm.adapters.configuration",
    "SpeechLMProjectorConfig": "speechlm.adapters.configuration",
    "SpeechLMForCausalLM": "speechlm.adapters.modeling",
    "apply_training_mode": "speechlm.adapters.modes",
    "merge_lora": "speechlm.adapters.modes",
    "SpeechLMPipeline": "speechlm.pipeline",
    "AudioChunk": "speechlm.responding",
    "SpeechLMReply": "speechlm.responding",
    "TextDelta": "speechlm.responding",
    "respond": "speechlm.responding",
    "stream_response": "speechlm.responding",
    "SpeechLMProcessor": "speechlm.speech_io.processor",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'speechlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
