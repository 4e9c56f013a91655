"""`ServeSettings`: how `speechlm serve` listens, admits and batches requests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from speechlm.responding import DEFAULT_MAX_SPEECH_UNITS, STREAM_CHUNK_FRAMES
from speechlm.speech_io.config_errors import ConfigProblems

API_KEY_ENV = "SPEECHLM_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Server settings; every field is a `speechlm serve` option of the same name."""

    host: str = "127.0.0.1"
    """Address to bind. The default answers this machine only; 0.0.0.0 opens it to the network."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: str | None = None
    """When set, every route asks for ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    model_name: str | None = None
    """The id clients send as ``model`` and ``GET /v1/models`` lists (default: the model path as given)."""
    max_batch_size: int = 8
    """Requests with the same decoding settings that run as one batched ``generate``."""
    max_waiting: int = 32
    """Requests that may wait for the model besides those it is decoding; past it a 429 (no unbounded queue)."""
    default_max_tokens: int = 256
    """Text tokens of an answer when the request sets neither ``max_completion_tokens`` nor ``max_tokens``."""
    max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS
    """Bound on a spoken answer (50 units a second); requests may ask for less with ``max_speech_units``."""
    stream_chunk_frames: int = STREAM_CHUNK_FRAMES
    """Codec frames per streamed audio delta (10 = 0.2 s)."""
    max_request_bytes: int = 32 * 1024 * 1024
    """Largest request body (base64 audio included); past it a 413."""
    chat_page: bool = False
    """Serve the voice chat page at ``/`` (`speechlm chat-ui`)."""

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        if not self.host:
            problems.append("host='': give an address to bind, e.g. 127.0.0.1")
        elif self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                problems.append(f"host={self.host!r}: not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1)")
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port}: expected 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty: give a key, or leave it out to serve without one")
        for name, low in (("max_batch_size", 1), ("max_waiting", 1), ("default_max_tokens", 1),
                          ("max_speech_units", 1), ("stream_chunk_frames", 1), ("max_request_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}={value!r}: expected an integer >= {low}")
        problems.raise_if_any("serve settings")

    @property
    def threads_needed(self) -> int:
        """Worker threads the app needs: every admitted request holds one while it waits for its tokens."""
        return self.max_batch_size + self.max_waiting + 8
