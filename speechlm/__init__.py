"""speechlm: turn Hugging Face Llama-family LLMs into Speech Language Models with adapters.

Importing it registers ``model_type="speechlm"`` with transformers' Auto classes.
"""

from speechlm.adapters.building import ModelSpec, build_processor, build_speechlm
from speechlm.adapters.configuration import SpeechLMAudioConfig, SpeechLMConfig, SpeechLMProjectorConfig
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.adapters.modes import apply_training_mode, merge_lora
from speechlm.pipeline import SpeechLMPipeline
from speechlm.registration import register
from speechlm.responding import AudioChunk, SpeechLMReply, TextDelta, respond, stream_response
from speechlm.speech_io.processor import SpeechLMProcessor

register()

__version__ = "0.1.0"
__all__ = [
    "AudioChunk",
    "ModelSpec",
    "SpeechLMAudioConfig",
    "SpeechLMConfig",
    "SpeechLMForCausalLM",
    "SpeechLMPipeline",
    "SpeechLMProcessor",
    "SpeechLMReply",
    "SpeechLMProjectorConfig",
    "TextDelta",
    "apply_training_mode",
    "build_processor",
    "build_speechlm",
    "merge_lora",
    "respond",
    "stream_response",
]
