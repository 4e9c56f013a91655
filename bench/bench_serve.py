"""Load on `speechlm serve` (run by hand; figures go to BENCHMARKS.md with this command).

    HF_HUB_OFFLINE=1 python bench/bench_serve.py [--model DIR] [--clients 1,4,16] [--requests 8]

Starts ``speechlm serve MODEL`` in a subprocess on a free port (default MODEL: the tiny default, built by
``speechlm init configs/tiny/model.yaml`` into a temporary folder), once with ``--max-batch-size`` as given
(default 16) and once with 1 (batching off, for comparison). For each client count C, C concurrent clients each
send ``--requests`` streamed requests one after another: configs/tiny/sample.flac and a question, answered
as text (``--max-tokens`` tokens) and, in a second round, as text + audio (pcm16, at most ``--max-speech-units``
units; the random tiny default starts speaking at once, so its text + audio answers have no text to time).
Per request: seconds to the first text delta, to the first audio delta, and to the end; per run: requests per second, errors (any
non-200, error event, or missing [DONE]), and the server's mean batch size. Goal: 0 errors, and 16 clients
>= 2x the requests per second of one client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT / "configs" / "tiny" / "sample.flac"


@dataclass
class Timing:
    first_text: float | None
    first_audio: float | None
    total: float
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, max_batch_size: int, max_waiting: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "speechlm.cli", "serve", model, "--port", str(port), "--model-name", "bench",
               "--max-batch-size", str(max_batch_size), "--max-waiting", str(max_waiting), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"speechlm serve exited with {process.returncode}")
    process.terminate()
    raise RuntimeError("speechlm serve did not start within 120 s")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Timing:
    start = time.perf_counter()
    first_text = first_audio = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Timing(None, None, time.perf_counter() - start, f"HTTP {response.status_code}")
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Timing(None, None, time.perf_counter() - start, chunk["error"]["message"])
                now = time.perf_counter() - start
                for choice in chunk["choices"]:
                    audio = choice["delta"].get("audio") or {}
                    if first_text is None and (audio.get("transcript") or choice["delta"].get("content")):
                        first_text = now
                    if first_audio is None and audio.get("data"):
                        first_audio = now
            if not finished:
                return Timing(first_text, first_audio, time.perf_counter() - start, "no [DONE]")
    except httpx.HTTPError as error:
        return Timing(None, None, time.perf_counter() - start, f"{type(error).__name__}: {error}")
    return Timing(first_text, first_audio, time.perf_counter() - start)


async def run_clients(port: int, clients: int, requests: int, body: dict) -> tuple[list[Timing], float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def client_loop() -> list[Timing]:
            return [await one_request(client, url, body) for _ in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop() for _ in range(clients)))
        return [timing for result in results for timing in result], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_answer(port: int, body: dict, answer: str, max_batch: int, counts: list[int], requests: int) -> None:
    asyncio.run(run_clients(port, 1, 2, body))  # warm-up
    for clients in counts:
        before = httpx.get(f"http://127.0.0.1:{port}/health").json()
        timings, wall = asyncio.run(run_clients(port, clients, requests, body))
        after = httpx.get(f"http://127.0.0.1:{port}/health").json()
        batches = after["batches_run"] - before["batches_run"]
        mean_batch = (after["requests_run"] - before["requests_run"]) / batches if batches else 0.0
        good = [t for t in timings if t.error is None]
        texts = [t.first_text for t in good if t.first_text is not None]
        audios = [t.first_audio for t in good if t.first_audio is not None]
        errors = [t.error for t in timings if t.error is not None]
        print(f"| {answer} | {max_batch} | {clients} | {len(timings)} | {len(errors)} | {len(good) / wall:.2f} | "
              f"{seconds(percentile(texts, 0.5))} / {seconds(percentile(texts, 0.95))} | "
              f"{seconds(percentile(audios, 0.5))} / {seconds(percentile(audios, 0.95))} | "
              f"{seconds(statistics.median([t.total for t in good]) if good else None)} | "
              f"{mean_batch:.1f} |", flush=True)
        if errors:
            print(f"errors: {sorted(set(errors))[:3]}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved SpeechLM directory (default: the tiny default, built here)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=8, help="requests each client sends, one after another")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-speech-units", type=int, default=100)
    parser.add_argument("--answers", default="text,text+audio", help="answer kinds to time: text, text+audio")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-size 1 comparison")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = str(Path(scratch) / "tiny")
            subprocess.run([sys.executable, "-m", "speechlm.cli", "init", str(ROOT / "configs/tiny/model.yaml"),
                            "--out", model], check=True, capture_output=True)
        question = {"model": "bench", "stream": True, "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": [
                        {"type": "input_audio", "input_audio": {"data": base64.b64encode(SAMPLE.read_bytes()).decode(),
                                                                "format": "flac"}},
                        {"type": "text", "text": "Answer the question you heard."}]}]}
        bodies = {"text": question, "text+audio": {**question, "modalities": ["text", "audio"],
                                                   "audio": {"format": "pcm16"},
                                                   "max_speech_units": args.max_speech_units}}
        print(f"model {args.model or 'tiny default (configs/tiny/model.yaml)'}; {platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{args.requests} streamed requests per client; max_tokens {args.max_tokens}, "
              f"max_speech_units {args.max_speech_units}\n")
        print("| answer | max batch | clients | requests | errors | requests/s | first text p50 / p95 (s) | "
              "first audio p50 / p95 (s) | whole p50 (s) | mean batch |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        batch_sizes = [args.max_batch_size] + ([] if args.no_unbatched else [1])
        for max_batch in batch_sizes:
            port = free_port()
            server = start_server(model, port, max_batch, max(counts) * 2)
            try:
                for answer in args.answers.split(","):
                    run_answer(port, bodies[answer], answer, max_batch, counts, args.requests)
            finally:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    main()
