"""Audio in and out: loading, validation, Whisper features, the codecs (SpeechTokenizer, whisper units) and the
vocoder, speech units.

Its modules import nothing of speechlm's outside this package (`tests/test_imports.py` checks it), so the
model stack depends on it and never the other way. Python still runs ``speechlm/__init__`` first, which
registers the Auto classes (and so imports the model's classes) on any ``import speechlm.*``.
"""
