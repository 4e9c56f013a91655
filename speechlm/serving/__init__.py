"""``speechlm serve``: an OpenAI-compatible HTTP API (and a voice chat page) over one SpeechLM.

- `settings`: `ServeSettings`, the server's options;
- `schema`, `conversation`, `audio_payload`: the request body checked, its messages and base64 audio
  turned into a processor conversation, and the spoken answer encoded;
- `batching`: the bounded waiting line and the worker that decodes requests in batches, streaming each row;
- `completions`: answers written as OpenAI's ``chat.completion`` objects and stream chunks;
- `app`: the FastAPI routes, API key, body limit and OpenAI-shaped errors; `chat_page.html` the page;
- `server`: load a model and run uvicorn, in the foreground or on a thread.

Needs the ``serve`` extra (FastAPI, uvicorn); importing this package alone does not, so the CLI can name it.
"""

from __future__ import annotations

from typing import Any

from speechlm.serving.settings import ServeSettings

_FROM_SERVER = ("RunningServer", "load_model", "serve", "start_server")
__all__ = ["ServeSettings", "build_app", *_FROM_SERVER]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from speechlm.serving.app import build_app

        return build_app
    if name in _FROM_SERVER:
        from speechlm.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'speechlm.serving' has no attribute {name!r}")
