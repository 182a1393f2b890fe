"""Benchmark of critloop's completion backends with the embedded model, with baselines, in one run.

Run from the repository root (the embedded model is fetched and cached on first use)::

    .venv/bin/python benchmarks/bench_models.py [--quick] [--json OUT]

What it measures, all end to end as a caller sees it (``time.perf_counter``):

1. SmolLM2-135M-Instruct on the CPU through the in-process :class:`TransformersEngine`:
   generated tokens per second one request at a time, and with 16 and 64 concurrent
   ``complete()`` calls (``asyncio.gather``) that the engine batches into one forward pass per
   token (``engine.batches_run`` shows how many batches really ran).
2. The same model (its Q4_1 GGUF) behind llama-cpp-python's OpenAI server, through
   :class:`OpenAICompletionModel`: tokens per second one request at a time, and with 4
   concurrent requests for reference (that server runs one request at a time).
3. The HTTP client's own cost per request against a server (a separate process) that answers
   instantly with a canned completions JSON: median and p99 of ``complete()`` called
   sequentially, next to the floors of raw ``httpx.AsyncClient.post`` of the same body (no
   parsing) and of a bare asyncio socket writing the same request bytes.

Throughput counts ``completion_tokens`` of the results (the end-of-sequence token included when a
sample ended on it), so a sample that stops early counts only what it produced. The machine may
be shared: the load average at the start and end is printed. The llama.cpp server this script
starts is stopped at the end, even on error or Ctrl-C. This is a benchmark, not a test: it exits
0 even when a target is missed (the verdicts are printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _process
import _report
from _machine import cpu_model as _cpu_model
from _machine import mem_total_gib as _mem_total_gib
from _machine import version as _version

from critloop.tools.completion import CompletionResult, SamplingParams

EMBEDDED = "smollm2-135m-instruct"
ENGINE_CONCURRENCY = (16, 64)
LLAMA_CONCURRENCY = 4
PROMPTS = (
    "Write a long story about numbers.",
    "Write a long story about a lighthouse keeper.",
    "Write a long story about a dragon who loves mathematics.",
    "Write a long story about a journey across the sea.",
    "Write a long story about a robot learning to paint.",
    "Write a long story about a city under the ice.",
    "Write a long story about two rival chess players.",
    "Write a long story about a forgotten library.",
)
TEMPERATURE = 0.7
TARGETS = {"client_overhead_p50_ms": 2.0}


@dataclass(frozen=True)
class Plan:
    """Request counts and lengths of one mode."""

    engine_sequential: int
    engine_tokens: int
    llama_sequential: int
    llama_tokens: int
    overhead_calls: int
    overhead_warmup: int
    engine_concurrency: tuple[int, ...] = ENGINE_CONCURRENCY
    llama_concurrency: int = LLAMA_CONCURRENCY


FULL = Plan(
    engine_sequential=8, engine_tokens=64, llama_sequential=16, llama_tokens=64,
    overhead_calls=2000, overhead_warmup=200,
)  # fmt: skip
QUICK = Plan(
    engine_sequential=2, engine_tokens=16, llama_sequential=2, llama_tokens=16,
    overhead_calls=300, overhead_warmup=50,
)  # fmt: skip


@dataclass
class Generation:
    """Tokens per second of one way of generating."""

    name: str
    backend: str
    concurrency: int
    requests: int
    max_tokens: int
    seconds: float
    completion_tokens: int
    prompt_tokens: int
    tokens_per_second: float
    request_p50_s: float
    request_max_s: float
    finished_by_length: int
    batches: int | None = None
    cpu_seconds: float | None = None
    """CPU time of the process doing the generating (all its threads): with wall time, it shows
    how much of the machine this measurement actually got on a shared host."""
    threads: int | None = None
    """Compute threads of the generating process (torch's, or the llama.cpp server's n_threads)."""
    prefill_seconds: float | None = None
    """Engine only: wall time inside the model's forward on the prompts (one call per batch)."""
    decode_seconds: float | None = None
    """Engine only: wall time inside the model's forward on one new token per row (per step)."""
    note: str = ""


Latency = _report.latency_type(
    "Latency", "us", (50, 90, 99), "Latency samples of one request kind, in microseconds."
)


@dataclass
class Report:
    command: str
    mode: str
    machine: dict[str, Any]
    generation: list[Generation] = field(default_factory=list)
    latency: dict[str, Latency] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- machine facts


def machine_facts() -> dict[str, Any]:
    import torch

    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        nproc = "?"
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "httpx": _version("httpx"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- generation


def _summarise(
    name: str,
    backend: str,
    concurrency: int,
    max_tokens: int,
    seconds: float,
    results: list[CompletionResult],
    latencies: list[float],
    batches: int | None = None,
    note: str = "",
    cpu_seconds: float | None = None,
    forward: ForwardTimer | None = None,
    threads: int | None = None,
) -> Generation:
    tokens = sum(r.completion_tokens for r in results)
    return Generation(
        name=name,
        backend=backend,
        concurrency=concurrency,
        requests=len(results),
        max_tokens=max_tokens,
        seconds=seconds,
        completion_tokens=tokens,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        tokens_per_second=tokens / seconds,
        request_p50_s=float(np.median(latencies)),
        request_max_s=float(max(latencies)),
        finished_by_length=sum(c.finish_reason == "length" for r in results for c in r.choices),
        batches=batches,
        cpu_seconds=cpu_seconds,
        threads=threads,
        prefill_seconds=None if forward is None else forward.prefill,
        decode_seconds=None if forward is None else forward.decode,
        note=note,
    )


class ForwardTimer:
    """Wraps a torch model's ``forward`` (on the instance only) to time prefill and decode calls."""

    def __init__(self, model: Any) -> None:
        self.prefill = 0.0
        self.decode = 0.0
        self.calls = 0
        inner = model.forward

        # wraps: the engine inspects forward's signature (to name the KV-cache argument).
        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                self.calls += 1
                if ids is not None and ids.shape[-1] > 1:
                    self.prefill += elapsed
                else:
                    self.decode += elapsed

        model.forward = forward

    def reset(self) -> ForwardTimer:
        self.prefill = self.decode = 0.0
        self.calls = 0
        return self


def _cpu_delta(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


async def _timed(model: Any, prompt: str, params: SamplingParams) -> tuple[CompletionResult, float]:
    t0 = time.perf_counter()
    result = await model.complete(prompt, params)
    return result, time.perf_counter() - t0


async def run_sequential(model: Any, prompts: list[str], max_tokens: int, seed0: int):
    results, latencies = [], []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, seed=seed0 + i)
        result, seconds = await _timed(model, prompt, params)
        results.append(result)
        latencies.append(seconds)
    return results, latencies, time.perf_counter() - t0


async def run_concurrent(model: Any, prompts: list[str], max_tokens: int, seed0: int):
    t0 = time.perf_counter()
    done = await asyncio.gather(
        *(
            _timed(model, p, SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, seed=seed0 + i))
            for i, p in enumerate(prompts)
        )
    )
    elapsed = time.perf_counter() - t0
    return [r for r, _ in done], [s for _, s in done], elapsed


def _prompts(template: Any, count: int) -> list[str]:
    rendered = [
        template.render([{"role": "user", "content": text}], add_generation_prompt=True) for text in PROMPTS
    ]
    return [rendered[i % len(rendered)] for i in range(count)]


async def bench_engine(plan: Plan, report: Report, console: Console) -> None:
    from critloop.tools.chat_template import ChatTemplate
    from critloop.tools.local_engine import TransformersEngine

    engine = TransformersEngine(EMBEDDED, device="cpu")
    try:
        t0 = time.perf_counter()
        engine.load()
        report.checks["engine_load_seconds"] = round(time.perf_counter() - t0, 2)
        import torch

        torch_threads = torch.get_num_threads()
        timer = ForwardTimer(engine._model)
        template = ChatTemplate(engine.tokenizer)
        report.samples["prompt (rendered)"] = _prompts(template, 1)[0]

        console.log("engine: warm-up")
        await engine.complete(
            _prompts(template, 1)[0], SamplingParams(max_tokens=8, temperature=TEMPERATURE, seed=0)
        )
        await asyncio.gather(
            *(
                engine.complete(p, SamplingParams(max_tokens=4, temperature=TEMPERATURE, seed=i))
                for i, p in enumerate(_prompts(template, 8))
            )
        )

        console.log(f"engine: {plan.engine_sequential} sequential requests of {plan.engine_tokens} tokens")
        before, cpu0 = engine.batches_run, time.process_time()
        timer.reset()
        results, latencies, seconds = await run_sequential(
            engine, _prompts(template, plan.engine_sequential), plan.engine_tokens, 1000
        )
        report.generation.append(
            _summarise(
                "engine seq", "transformers in-process", 1, plan.engine_tokens, seconds,
                results, latencies, engine.batches_run - before, "one request at a time",
                time.process_time() - cpu0, timer, torch_threads,
            )
        )  # fmt: skip
        report.samples["engine sequential answer"] = results[0].choices[0].text

        for concurrency in plan.engine_concurrency:
            console.log(f"engine: {concurrency} concurrent requests of {plan.engine_tokens} tokens")
            before, cpu0 = engine.batches_run, time.process_time()
            timer.reset()
            results, latencies, seconds = await run_concurrent(
                engine, _prompts(template, concurrency), plan.engine_tokens, 2000 + concurrency
            )
            batches = engine.batches_run - before
            expected = -(-concurrency // engine.max_batch_rows)
            report.checks[f"engine_x{concurrency}_batches"] = f"{batches} (fewest possible {expected})"
            report.generation.append(
                _summarise(
                    f"engine x{concurrency}", "transformers in-process", concurrency,
                    plan.engine_tokens, seconds, results, latencies, batches,
                    f"asyncio.gather; max_batch_rows={engine.max_batch_rows}",
                    time.process_time() - cpu0, timer, torch_threads,
                )
            )  # fmt: skip
    finally:
        await engine.aclose()


# --------------------------------------------------------------------------- llama.cpp server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` as a subprocess, stopped by :meth:`stop` whatever happens."""

    def __init__(self, gguf: Path, threads: int) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.argv = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(self.port),
            "--host", "127.0.0.1", "--n_ctx", "4096", "--n_threads", str(threads),
        ]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile(prefix="bench-llama-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> str:
        """Start the server and wait until ``/v1/models`` answers; return the model id."""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.base_url}/models", timeout=2.0)
                if response.status_code == 200:
                    return str(response.json()["data"][0]["id"])
            time.sleep(0.25)
        raise RuntimeError(f"llama.cpp server did not answer within {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self) -> int | None:
        if self.proc is not None:
            _process.stop(self.proc)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        return None if self.proc is None else self.proc.returncode


async def bench_llama(
    plan: Plan, report: Report, console: Console, gguf: Path, threads: int, hf: Path
) -> None:
    from critloop.tools.chat_template import ChatTemplate
    from critloop.tools.openai_client import OpenAICompletionModel

    template = ChatTemplate.from_pretrained(str(hf))
    server = LlamaServer(gguf, threads)
    report.checks["llama_server_argv"] = shlex.join(server.argv)
    try:
        console.log(f"llama.cpp: starting the server on port {server.port}")
        t0 = time.perf_counter()
        model_id = await asyncio.to_thread(server.start)
        report.checks["llama_server_start_seconds"] = round(time.perf_counter() - t0, 2)
        async with OpenAICompletionModel(server.base_url, model_id, name="llama.cpp") as model:
            console.log("llama.cpp: warm-up")
            for i, prompt in enumerate(_prompts(template, 2)):
                await model.complete(prompt, SamplingParams(max_tokens=16, temperature=TEMPERATURE, seed=i))
            assert server.proc is not None
            pid = server.proc.pid

            console.log(
                f"llama.cpp: {plan.llama_sequential} sequential requests of {plan.llama_tokens} tokens"
            )
            cpu0 = _process.cpu_seconds(pid)
            results, latencies, seconds = await run_sequential(
                model, _prompts(template, plan.llama_sequential), plan.llama_tokens, 1000
            )
            cpu = _cpu_delta(cpu0, _process.cpu_seconds(pid))
            report.generation.append(
                _summarise(
                    "llama.cpp seq", "llama-cpp-python server (GGUF Q4_1)", 1,
                    plan.llama_tokens, seconds, results, latencies, None,
                    f"OpenAICompletionModel; n_threads={threads}", cpu, None, threads,
                )
            )  # fmt: skip
            report.samples["llama.cpp sequential answer"] = results[0].choices[0].text

            c = plan.llama_concurrency
            console.log(f"llama.cpp: {c} concurrent requests of {plan.llama_tokens} tokens")
            cpu0 = _process.cpu_seconds(pid)
            results, latencies, seconds = await run_concurrent(
                model, _prompts(template, c), plan.llama_tokens, 2000 + c
            )
            cpu = _cpu_delta(cpu0, _process.cpu_seconds(pid))
            report.generation.append(
                _summarise(
                    f"llama.cpp x{c}", "llama-cpp-python server (GGUF Q4_1)", c,
                    plan.llama_tokens, seconds, results, latencies, None, "server serialises requests",
                    cpu, None, threads,
                )
            )  # fmt: skip
    finally:
        code = server.stop()
        report.checks["llama_server_stopped"] = server.proc is None or server.proc.poll() is not None
        report.checks["llama_server_exit_code"] = code


# --------------------------------------------------------------------------- instant server


_OVERHEAD_TOKENS = (" The", " answer", " is", " 4")


def _canned_completion() -> bytes:
    """A valid completions answer with a 4-token ``logprobs`` block (2 alternatives each) and usage."""
    tops = [{tok: -0.1 * (i + 1), f" alt{i}": -2.0 - i} for i, tok in enumerate(_OVERHEAD_TOKENS)]
    body = {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "bench-instant",
        "choices": [
            {
                "index": 0,
                "text": "".join(_OVERHEAD_TOKENS),
                "finish_reason": "length",
                "logprobs": {
                    "tokens": list(_OVERHEAD_TOKENS),
                    "token_logprobs": [-0.1 * (i + 1) for i in range(len(_OVERHEAD_TOKENS))],
                    "top_logprobs": tops,
                    "text_offset": [0, 4, 11, 14],
                },
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }
    return json.dumps(body).encode()


async def _serve_instant(ready: Any) -> None:
    payload = _canned_completion()
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
    )
    response = head + payload

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in headers.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    ready.close()
    async with server:
        await server.serve_forever()


def instant_server_main(ready: Any) -> None:
    """Entry point of the instant server's process (ends when the parent terminates it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(_serve_instant(ready))


async def _timed_loop(call: Any, n: int, warmup: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    for i in range(warmup + n):
        t0 = clock()
        await call()
        t1 = clock()
        if i >= warmup:
            samples.append(t1 - t0)
    return samples


async def bench_overhead(plan: Plan, report: Report, console: Console, port: int) -> None:
    from critloop.tools.openai_client import OpenAICompletionModel

    base_url = f"http://127.0.0.1:{port}/v1"
    prompt = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)
    n, warmup = plan.overhead_calls, plan.overhead_warmup

    async with OpenAICompletionModel(base_url, "bench-instant", timeout_seconds=30.0) as model:
        body = model._body(prompt, params, params.n, params.seed)
        url = f"{base_url}/completions"
        check = await model.complete(prompt, params)
        report.checks["instant_server_parsed"] = (
            check.choices[0].text == "".join(_OVERHEAD_TOKENS)
            and check.completion_tokens == 4
            and check.choices[0].tokens is not None
            and len(check.choices[0].tokens) == 4
            and len(check.choices[0].tokens[0].top) == 2
        )
        console.log(f"client overhead: {n} sequential complete() calls against the instant server")
        samples = await _timed_loop(lambda: model.complete(prompt, params), n, warmup)
        report.latency["client"] = Latency.of(
            "OpenAICompletionModel.complete()", samples, "JSON body, retry wrapper, parse, pydantic results"
        )

    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:

        async def raw_post() -> None:
            response = await client.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"instant server answered HTTP {response.status_code}")

        console.log(f"raw httpx floor: {n} sequential posts")
        report.latency["httpx"] = Latency.of(
            "httpx.AsyncClient.post (no parsing)", await _timed_loop(raw_post, n, warmup), "same body, json="
        )

    request = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(json.dumps(body).encode())}\r\n\r\n"
    ).encode() + json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def raw_socket() -> None:
            writer.write(request)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = int(headers.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)

        console.log(f"raw socket floor: {n} sequential requests")
        report.latency["socket"] = Latency.of(
            "asyncio socket write + read (no HTTP lib)", await _timed_loop(raw_socket, n, warmup),
            "server + loopback + event loop floor",
        )  # fmt: skip
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def run_overhead(plan: Plan, report: Report, console: Console) -> None:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=instant_server_main, args=(send,), name="bench-instant-server", daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(60):
            raise RuntimeError("the instant server did not start within 60 s")
        port = int(receive.recv())
        asyncio.run(bench_overhead(plan, report, console, port))
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        report.checks["instant_server_stopped"] = not proc.is_alive()


# --------------------------------------------------------------------------- output


def _concurrency_ratios(report: Report, sequential: Generation, name: str) -> None:
    """Tokens per second of each concurrent run of ``sequential``'s backend over its own; ``name``
    holds ``{}`` for the concurrency."""
    for g in report.generation:
        if g.backend == sequential.backend and g.concurrency > 1:
            report.ratios[name.format(g.concurrency)] = g.tokens_per_second / sequential.tokens_per_second


def compute_ratios_and_targets(report: Report) -> None:
    by_name = {g.name: g for g in report.generation}
    seq = by_name.get("engine seq")
    if seq is not None:
        _concurrency_ratios(report, seq, "engine x{} batched / sequential (tokens/s)")
    llama = by_name.get("llama.cpp seq")
    if llama is not None:
        _concurrency_ratios(report, llama, "llama.cpp x{} / sequential (tokens/s)")
        if seq is not None:
            report.ratios["llama.cpp sequential / engine sequential (tokens/s)"] = (
                llama.tokens_per_second / seq.tokens_per_second
            )
            best = max(
                (g for g in report.generation if g.backend == seq.backend), key=lambda g: g.tokens_per_second
            )
            report.ratios[f"engine best (x{best.concurrency}) / llama.cpp sequential (tokens/s)"] = (
                best.tokens_per_second / llama.tokens_per_second
            )
    lat = report.latency
    if "client" in lat and "httpx" in lat:
        report.ratios["client p50 / httpx p50"] = lat["client"].p50_us / lat["httpx"].p50_us
        report.checks["client p50 minus httpx p50 (us)"] = round(
            lat["client"].p50_us - lat["httpx"].p50_us, 1
        )
    if "httpx" in lat and "socket" in lat:
        report.checks["httpx p50 minus socket p50 (us)"] = round(
            lat["httpx"].p50_us - lat["socket"].p50_us, 1
        )
    if "client" in lat:
        value = lat["client"].p50_us / 1e3
        limit = TARGETS["client_overhead_p50_ms"]
        report.targets.append(
            {
                "target": "client complete() p50 against an instant server",
                "value": value,
                "op": "<",
                "limit": limit,
                "unit": "ms",
                "met": value < limit,
                "note": "whole round trip: server and loopback included",
            }
        )


def render(report: Report, console: Console) -> None:
    console.print(_report.machine_table(report.command, report.mode, report.machine))

    if report.generation:
        table = Table(
            title=f"Generation: SmolLM2-135M-Instruct on the CPU, temperature {TEMPERATURE}, seeded"
        )
        cols = (
            "measurement", "conc", "reqs", "max", "tokens", "by len", "wall s", "tokens/s",
            "req p50 s", "req max s", "batches", "cpu s", "cpu %", "tok/cpu-s", "prefill s", "decode s",
            "other s",
        )  # fmt: skip
        for col in cols:
            table.add_column(
                col, justify="left" if col == "measurement" else "right", no_wrap=True, min_width=len(col)
            )

        def opt(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        def cpu_share(g: Generation) -> str:
            if g.cpu_seconds is None or not g.threads:
                return "-"
            return f"{100 * g.cpu_seconds / (g.seconds * g.threads):.0f}"

        def per_cpu(g: Generation) -> str:
            return "-" if not g.cpu_seconds else f"{g.completion_tokens / g.cpu_seconds:,.1f}"

        for g in report.generation:
            other = None
            if g.prefill_seconds is not None and g.decode_seconds is not None:
                other = g.seconds - g.prefill_seconds - g.decode_seconds
            table.add_row(
                g.name, str(g.concurrency), str(g.requests), str(g.max_tokens), str(g.completion_tokens),
                f"{g.finished_by_length}/{g.requests}", f"{g.seconds:.2f}", f"{g.tokens_per_second:,.1f}",
                f"{g.request_p50_s:.2f}", f"{g.request_max_s:.2f}",
                "-" if g.batches is None else str(g.batches), opt(g.cpu_seconds), cpu_share(g), per_cpu(g),
                opt(g.prefill_seconds), opt(g.decode_seconds), opt(other),
            )  # fmt: skip
        console.print(table)
        console.print(
            "  conc: requests in flight; max: max_tokens; tokens: completion_tokens summed over the results; "
            "by len: samples that ran to max_tokens; "
            "cpu s: CPU time of the generating process (this one for the engine, the server for "
            "llama.cpp, whose threads spin while waiting); cpu %: cpu s / (wall s x its threads), the share "
            "of its thread budget it got on this shared machine; tok/cpu-s: tokens per CPU second; "
            "prefill/decode s: wall time inside the model's forward on the prompts / on one "
            "token per row; other s: the rest (sampling, logprobs, Python, asyncio, thread hand-off)."
        )
        for g in report.generation:
            if g.note:
                console.print(f"  {g.name}: {g.note}")

    if report.latency:
        numbers = ("n", "p50 us", "p90 us", "p99 us", "mean us", "min us", "max us")
        table = _report.table(
            "Per-request cost against an instant server (separate process), sequential calls",
            ("measurement", *numbers, "note"),
            numbers,
        )
        for key in ("socket", "httpx", "client"):
            if key in report.latency:
                s = report.latency[key]
                numbers = (s.p50_us, s.p90_us, s.p99_us, s.mean_us, s.min_us, s.max_us)
                table.add_row(s.name, str(s.n), *(f"{v:,.0f}" for v in numbers), s.note)
        console.print(table)

    if report.ratios:
        table = _report.table("Ratios", ("ratio", "value"), ("value",))
        for name, value in report.ratios.items():
            table.add_row(name, f"{value:.2f}x")
        console.print(table)

    if report.targets:
        table = _report.table("Targets", ("target", "value", "limit", "verdict", "note"), ("value", "limit"))
        for t in report.targets:
            verdict = _report.verdict(t["met"])
            table.add_row(
                t["target"], f"{t['value']:.3f} ms", f"{t['op']} {t['limit']:g} ms", verdict, t["note"]
            )
        console.print(table)

    table = _report.checks_table(report.checks)
    for key, value in report.samples.items():
        table.add_row(key, repr(value[:160] + ("..." if len(value) > 160 else "")))
    console.print(table)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = _report.arguments(__doc__, "far fewer and shorter requests (a smoke run)")
    parser.add_argument(
        "--llama-threads",
        type=int,
        default=None,
        help="n_threads of the llama.cpp server (default: torch's thread count: the same CPU budget)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    console = _report.wide_console(180)
    _process.interrupt_on_sigterm()

    from critloop.tools.embedded import fetch_model

    command = _report.command_line()
    report = Report(command=command, mode="quick" if args.quick else "full", machine=machine_facts())
    report.checks["plan"] = asdict(plan)
    threads = args.llama_threads or int(report.machine["torch_threads"])
    console.print(f"[bold]command:[/bold] {command}")
    m = report.machine
    console.print(
        f"[bold]machine:[/bold] nproc={m['nproc']}  {m['cpu_model']}  torch {m['torch']} "
        f"({m['torch_threads']} threads)  transformers {m['transformers']}  llama-cpp-python "
        f"{m['llama_cpp_python']}  httpx {m['httpx']}  loadavg {m['loadavg_start']}"
    )

    cached = fetch_model(EMBEDDED, progress=console.log)
    if cached.gguf is None:
        raise SystemExit(
            f"the cached {EMBEDDED} has no GGUF file: refetch it (critloop models fetch --force)"
        )
    report.machine["model_hf"] = str(cached.path)
    report.machine["model_gguf"] = str(cached.gguf)

    failures: list[str] = []
    for label, step in (
        ("engine", lambda: asyncio.run(bench_engine(plan, report, console))),
        (
            "llama.cpp",
            lambda: asyncio.run(bench_llama(plan, report, console, cached.gguf, threads, cached.path)),
        ),
        ("client overhead", lambda: run_overhead(plan, report, console)),
    ):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - report the others' numbers; the failure is printed
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            console.print(f"[red]{label} failed:[/red] {type(exc).__name__}: {exc}")

    report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report.checks["failures"] = failures or "none"
    compute_ratios_and_targets(report)
    render(report, console)
    if args.json:
        _report.write_json(args.json, {**asdict(report), "targets_config": TARGETS}, console)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
