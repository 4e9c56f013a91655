"""The FastAPI app: OpenAI's ``/v1/chat/completions`` and ``/v1/models`` over one SpeechLM, the voice chat
page at ``/`` when asked for, the API key on every route, errors in OpenAI's shape.

Request handling runs off the event loop (decoding base64 audio, the processor's check of the prompt,
waiting for tokens), so one slow request never stalls the others; the model itself is driven by the
`BatchScheduler`'s worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from speechlm.responding import speaking_decoder
from speechlm.serving.batching import BatchScheduler, GenerationJob, QueueFull, SchedulerClosed
from speechlm.serving.completions import completion, completion_chunks
from speechlm.serving.conversation import RecentReplies
from speechlm.serving.errors import APIError, bad_request, validation_error
from speechlm.serving.schema import ChatCall, ChatCompletionRequest, parse_chat_request
from speechlm.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

CHAT_PAGE = "chat_page.html"
PUBLIC_PATHS = ("/",)  # the chat page: static HTML holding no data and no key (it asks for the key itself)


def build_app(model, processor, settings: ServeSettings, *, model_name: str) -> FastAPI:
    """The app serving ``model`` as ``model_name``; its batch worker runs while the app does (lifespan)."""
    scheduler = BatchScheduler(model, processor, max_batch_size=settings.max_batch_size,
                               max_waiting=settings.max_waiting)
    replies = RecentReplies()
    started = int(time.time())
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    # The codec loaded now, once: a broken one fails at startup, not in a request; a codec that cannot decode
    # yet (whisper units before their vocoder) leaves a server that answers in text and says why it cannot speak.
    cannot_speak = processor.cannot_speak
    if cannot_speak is not None and processor.has_codec:
        logger.warning("%s cannot answer in audio: %s", model_name, cannot_speak)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Every admitted request holds a worker thread while it waits for its tokens.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.threads_needed)
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="speechlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyCheck, api_key=settings.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(list(error.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return await api_error(request, APIError(error.status_code, message, code=_code(error.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"the server failed on this request: "
                                                      f"{type(error).__name__}: {error}", type="server_error"))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return _model_card(model_name, started)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **scheduler.stats()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        call = await run_in_threadpool(accept, body)
        job = GenerationJob(call.conversation, call.decode)
        try:
            scheduler.submit(job)
        except QueueFull as full:
            raise APIError(429, f"the server is at capacity: {full}", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except SchedulerClosed as closed:
            raise APIError(503, str(closed), type="server_error", code="shutting_down") from None
        events = job.events(processor, settings.stream_chunk_frames)
        if call.stream:
            return StreamingResponse(_server_sent_events(completion_chunks(call, job, events, replies), job),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await run_in_threadpool(completion, call, job, events, replies)
        finally:
            job.cancel()  # a no-op when it finished; stops the row when this request was cancelled

    def accept(body: ChatCompletionRequest) -> ChatCall:
        """The request checked against the model: fields, audio, and the prompt's room in the context."""
        call = parse_chat_request(body, served_model=model_name, cannot_speak=cannot_speak,
                                  max_audio_seconds=processor.max_audio_seconds, settings=settings, replies=replies)
        try:
            prompt_tokens = int(processor([call.conversation])["input_ids"].shape[1])
        except ValueError as error:
            raise bad_request(f"messages: {error}", param="messages", code="invalid_value") from None
        budget = {"text": call.decode.max_new_tokens, "speech": call.decode.max_speech_units + 3,
                  "text+speech": call.decode.max_new_tokens + call.decode.max_speech_units + 3}[call.decode.output]
        if speaking_decoder(processor, call.decode.output) is not None:  # the LM writes; the decoder speaks
            budget = call.decode.max_new_tokens
        if max_positions is not None and prompt_tokens + budget > max_positions:
            raise bad_request(f"This model's maximum context length is {max_positions} tokens. However, you "
                              f"requested {prompt_tokens + budget} tokens ({prompt_tokens} in the messages, {budget} "
                              f"in the completion). Please reduce the length of the messages or completion.",
                              param="messages", code="context_length_exceeded")
        return call

    if settings.chat_page:
        page = resources.files("speechlm.serving").joinpath(CHAT_PAGE).read_text(encoding="utf-8")
        page = page.replace("{{MODEL}}", json.dumps(model_name).replace("<", "\\u003c"))  # inside <script>

        @app.get("/", response_class=HTMLResponse)
        async def chat_page() -> str:
            return page

    return app


async def _server_sent_events(chunks: Iterator[dict[str, Any]], job: GenerationJob) -> AsyncIterator[str]:
    """``data: {chunk}`` events as the chunks come (each waited for off the event loop), then ``[DONE]``.
    A failure after the stream began is sent as an ``error`` event, which OpenAI's clients raise."""
    done = object()
    try:
        while (chunk := await run_in_threadpool(next, chunks, done)) is not done:
            yield f"data: {json.dumps(chunk)}\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as error:
        failure = APIError(500, f"decoding failed: {type(error).__name__}: {error}", type="server_error")
        yield f"data: {json.dumps(failure.body())}\n\n"
    finally:
        job.cancel()  # the client left (or the answer is done): stop decoding this row
    yield "data: [DONE]\n\n"


def _model_card(model_name: str, created: int) -> dict[str, Any]:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "speechlm"}


def _code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)


class APIKeyCheck:
    """``Authorization: Bearer <key>`` on every route but the chat page's static HTML; a 401 otherwise."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "GET" and scope["path"] in PUBLIC_PATHS):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key: send it as 'Authorization: Bearer YOUR_KEY'.")
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await JSONResponse(error.body(), status_code=401, headers=error.headers)(scope, receive, send)


class BodySizeLimit:
    """A 413 for a body larger than ``max_bytes``, by its Content-Length or as it arrives (chunked).

    The body is read here, up to the bound, and handed on whole: past this point nothing reads an
    unbounded body (FastAPI would turn an error raised while it reads into a generic 400)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # later calls wait for the client to disconnect, as a streamed response asks
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                              f"(speechlm serve --max-request-bytes)", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)
