"""Load a saved SpeechLM and serve it with uvicorn: in the foreground (`speechlm serve`), or on a background
thread (`start_server`: tests, benchmarks, a notebook)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from speechlm.serving.app import build_app
from speechlm.serving.settings import ServeSettings


def load_model(model: str, *, device: str | None = None, dtype: str | None = None):
    """``(model, processor)`` of a saved SpeechLM directory or Hub id, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import speechlm  # noqa: F401  (registers the Auto classes)

    processor = AutoProcessor.from_pretrained(model)
    kwargs = {"dtype": dtype} if dtype else {}
    lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if device:
        lm = lm.to(device)
    return lm.eval(), processor


def serve(model: str, settings: ServeSettings, *, device: str | None = None, dtype: str | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    lm, processor = load_model(model, device=device, dtype=dtype)
    app = build_app(lm, processor, settings, model_name=settings.model_name or model)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)


@dataclass
class RunningServer:
    """A server on a background thread; ``stop()`` shuts it down and joins the thread."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model, processor, settings: ServeSettings, *, model_name: str,
                 log_level: str = "warning") -> RunningServer:
    """Serve ``model`` on a background thread at ``settings.host``:``settings.port`` (0: a free port, bound
    before this returns, so there is no race for it); returns once the server accepts requests."""
    app = build_app(model, processor, settings, model_name=model_name)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="speechlm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see its log above)")
        time.sleep(0.02)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return RunningServer(url=f"http://{shown}:{port}", server=server, thread=thread)
