"""The quick start's real components: pinned registry weights, checked and built into a cache, and a
synthesized speech corpus. Kept apart from the library's core; needs the ``demo`` extra.

- `speechlm.demo.assets`: the pinned files (SHA-256), the backbone, Whisper and codec builds;
- `speechlm.demo.texts` / `speechlm.demo.corpus`: the corpus texts and its synthesis, manifests and card;
- `speechlm.demo.build`: everything at once (``python -m speechlm.demo assets --size ci|full``).
"""
