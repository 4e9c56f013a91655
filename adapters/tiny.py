"""Tiny random components built from code: the embedded CPU default and the test suite's building blocks.

Nothing here downloads: the tokenizer is byte-level (every UTF-8 text encodes, no training needed) with
a ChatML chat template like SmolLM2's, and the backbones are random models of a few hundred K params.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BYTE_TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>`` (ids 256..258), and a ChatML chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(BYTE_TOKENIZER_SPECIALS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.bos_token = None
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


BYTE_VOCAB_SIZE = 256 + len(BYTE_TOKENIZER_SPECIALS)
