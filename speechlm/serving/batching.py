"""Requests decoded together: a bounded waiting line, one worker running batched ``generate``, and each
row's tokens handed to its own request while the batch is still decoding.

``generate`` cannot take new rows mid-flight, so batching is by turns: while one batch decodes, requests
wait (at most ``max_waiting``; past that `submit` raises `QueueFull`, a 429), and the next batch takes the
oldest waiting request with every later one that has the same `DecodeSettings`, up to ``max_batch_size``.
A row that ends (EOS) stops streaming at once; a row whose client left is stopped by a stopping criterion,
and the batch ends when every row has. Calls take `speechlm.pipeline.model_lock`, so the server shares a
model safely with pipelines in the same process.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from speechlm.pipeline import model_lock
from speechlm.responding import (
    ResponseEvent,
    eos_token_ids,
    generation_settings,
    response_events,
    speaking_decoder,
    spoken_token_stream,
)


@dataclass(frozen=True)
class DecodeSettings:
    """How one answer is decoded; requests batch together only when these are equal."""

    output: str  # "text", "speech" or "text+speech"
    max_new_tokens: int  # text tokens
    max_speech_units: int
    temperature: float | None = None  # None: the model's generation config (greedy for speechlm); 0: greedy
    top_p: float | None = None
    seed: int | None = None  # a seeded request decodes alone, so that its seed reproduces its answer

    def sampling_kwargs(self) -> dict[str, Any]:
        if self.temperature is None and self.top_p is None:
            return {}
        if self.temperature == 0:
            return {"do_sample": False}
        kwargs: dict[str, Any] = {"do_sample": True, "temperature": self.temperature or 1.0}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs


class QueueFull(Exception):
    """The waiting line is full: the request is refused, not queued."""


class SchedulerClosed(Exception):
    """The server is shutting down and takes no more requests."""


class GenerationJob:
    """One request's way through the scheduler: a conversation in, its new token ids out as they come."""

    _END = object()

    def __init__(self, conversation: list[dict], settings: DecodeSettings):
        self.conversation = conversation
        self.settings = settings
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.speech_units = 0
        self.finish_reason: str | None = None  # "stop" (EOS), "length" (budget), "cancelled"
        self.error: BaseException | None = None
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: stop decoding this row (the others of its batch go on)."""
        self._cancelled.set()

    def token_ids(self) -> Iterator[int]:
        """New token ids as the batch decodes them; raises the batch's error, if it failed."""
        while (token := self._tokens.get()) is not self._END:
            yield token
        if self.error is not None:
            raise self.error

    def events(self, processor, chunk_frames: int) -> Iterator[ResponseEvent]:
        """Text deltas and audio chunks, as `speechlm.stream_response` yields them (the codec's speech decoder
        speaking each sentence the LM ends, where it speaks for the LM)."""
        tokens = self.token_ids()
        decoder = speaking_decoder(processor, self.settings.output)
        if decoder is not None:
            tokens = self._counting_units(processor, spoken_token_stream(
                processor, decoder, tokens, self.settings.output, max_speech_units=self.settings.max_speech_units))
        return response_events(processor, tokens, chunk_frames)

    def _counting_units(self, processor, tokens: Iterator[int]) -> Iterator[int]:
        """``tokens``, counting the speech decoder's units as the LM's are counted (the usage's audio tokens)."""
        units = range(processor.speech_unit_start_id, processor.speech_unit_start_id + processor.num_speech_units)
        for token in tokens:
            self.speech_units += token in units
            yield token

    # -- the worker's side ---------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def put(self, token: int) -> None:
        self.completion_tokens += 1
        self._tokens.put(token)

    def finish(self, reason: str) -> None:
        if not self.ended:
            self.finish_reason = reason
            self._tokens.put(self._END)

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self.error = error
            self.finish("error")


class BatchScheduler:
    """Admits requests up to a bound and decodes them in batches on one worker thread."""

    def __init__(self, model, processor, *, max_batch_size: int, max_waiting: int):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # of the latest batches, for measuring
        self.batches_run = 0
        self.requests_run = 0
        self.finish_reasons: Counter[str] = Counter()  # of every request decoded
        self._waiting: deque[GenerationJob] = deque()
        self._running: list[GenerationJob] = []
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="speechlm-batches", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def stats(self) -> dict[str, Any]:
        """What the server is doing, and what it did (``/health``)."""
        with self._condition:
            sizes = list(self.batch_sizes)
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "recent_mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None,
                    "batches_run": self.batches_run, "requests_run": self.requests_run,
                    "finish_reasons": dict(self.finish_reasons)}

    def start(self) -> None:
        self._worker.start()

    def submit(self, job: GenerationJob) -> None:
        with self._condition:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._running)} requests are being decoded and {len(self._waiting)} are "
                                f"waiting (the bound); retry shortly")
            self._waiting.append(job)
            self._condition.notify()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse what waits, stop what decodes, and join the worker."""
        with self._condition:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job.cancel()
            self._condition.notify()
        for job in waiting:
            job.fail(RuntimeError("the server shut down before this request was decoded"))
        if self._worker.is_alive():
            self._worker.join(timeout)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                decode_batch(self.model, self.processor, batch)
            except Exception as error:  # handed to each request of the batch; the worker keeps serving
                for job in batch:
                    job.fail(error)
            finally:
                for job in batch:  # rows that never reached EOS ran out of budget
                    job.finish("cancelled" if job.cancelled else "length")
                with self._condition:
                    self.finish_reasons.update(job.finish_reason for job in batch)
                    self._running = []

    def _next_batch(self) -> list[GenerationJob] | None:
        with self._condition:
            while True:
                for job in [job for job in self._waiting if job.cancelled]:
                    self._waiting.remove(job)
                    job.finish("cancelled")
                    self.finish_reasons["cancelled"] += 1
                if self._closed:
                    return None
                if self._waiting:
                    break
                self._condition.wait()
            first = self._waiting.popleft()
            batch = [first]
            if first.settings.seed is None:
                for job in list(self._waiting):
                    if len(batch) == self.max_batch_size:
                        break
                    if job.settings == first.settings:
                        self._waiting.remove(job)
                        batch.append(job)
            self._running = batch
            self.batch_sizes.append(len(batch))
            self.batches_run += 1
            self.requests_run += len(batch)
            return batch


def decode_batch(model, processor, jobs: list[GenerationJob]) -> None:
    """One batched ``generate`` over the jobs' conversations (all with the same settings), each row's new
    tokens handed to its job as they are decoded."""
    settings = jobs[0].settings
    inputs = processor([job.conversation for job in jobs]).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    for job, mask in zip(jobs, inputs["attention_mask"], strict=True):
        job.prompt_tokens = int(mask.sum())
    speaks = speaking_decoder(processor, settings.output) is None  # else the LM writes and the decoder speaks
    kwargs = generation_settings(model, processor, prompt_length, output=settings.output if speaks else "text",
                                 max_new_tokens=settings.max_new_tokens, max_speech_units=settings.max_speech_units,
                                 **settings.sampling_kwargs())
    streamer = _RowStreamer(jobs, eos_token_ids(model, processor), processor.speech_unit_start_id,
                            processor.num_speech_units)
    with model_lock(model):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            model.generate(**inputs, **kwargs, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([_StopCancelledRows(jobs)]))


class _RowStreamer(BaseStreamer):
    """``generate``'s streamer for a batch: each row's tokens to its job, until the row's EOS."""

    def __init__(self, jobs: list[GenerationJob], eos_ids: list[int], first_unit: int, num_units: int):
        self.jobs = jobs
        self.eos_ids = set(eos_ids)
        self.units = range(first_unit, first_unit + num_units)
        self.skipped_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate pushes the prompt first
            self.skipped_prompt = True
            return
        for job, row in zip(self.jobs, value.reshape(len(self.jobs), -1).tolist(), strict=True):
            for token in row:
                if job.ended:
                    break
                if job.cancelled:
                    job.finish("cancelled")
                elif token in self.eos_ids:
                    job.finish("stop")
                else:
                    job.speech_units += token in self.units
                    job.put(token)

    def end(self) -> None:
        for job in self.jobs:
            job.finish("cancelled" if job.cancelled else "length")


class _StopCancelledRows(StoppingCriteria):
    def __init__(self, jobs: list[GenerationJob]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([job.cancelled for job in self.jobs], dtype=torch.bool, device=input_ids.device)
