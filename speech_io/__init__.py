"""Audio in and out: loading, validation, Whisper features, the SpeechTokenizer codec, speech units.

Imports nothing else of speechlm's, so that data tooling can use it without the model stack.
"""
