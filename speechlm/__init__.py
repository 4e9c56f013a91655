"""speechlm: turn Hugging Face Llama-family LLMs into Speech Language Models with adapters."""
