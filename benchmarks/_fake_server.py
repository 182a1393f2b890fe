"""A fake OpenAI-compatible ``/v1/completions`` server that plays a GenPRM critic, for benchmarks.

It is a minimal asyncio HTTP/1.1 server (keep-alive, ``content-length`` bodies only) meant to
run in its own process, so that its work does not share the benchmark's event loop::

    with FakeCriticServer() as server:          # starts `python _fake_server.py` and waits
        url = server.base_url(delay_ms=100)     # http://127.0.0.1:PORT/d/100/v1
        ...
        server.stats()                          # requests seen, per kind, most in flight

Every request to ``.../completions`` is answered after the delay in its path (``/d/<ms>/...``;
none: at once) with a completion chosen by how the prompt ends, as a GenPRM critic that always
writes code once and then says Yes would answer:

* ``... step by step: `` (analyze) -> an analysis ending ``</analyze>\\n``;
* ``...```python\\n`` (verify)      -> ``print(3 * 4)\\n```\\n``;
* ``[Code Output] ... ```\\n``      -> a comment, ``</verify>``, then
  ``<output>\\n**Judgement**: $\\boxed{Yes}$\\n</output>\\n``;
* ``...</analyze>\\n<output>...\\boxed`` (the judgement after the analysis alone: the cascade's
  analysis tier, or a forced judgement) -> ``{Yes}$\\n</output>\\n``;
* ``...\\boxed`` with no analysis before it (the cascade's direct judgement) -> the same;
* a policy's prompt (it asks to reason step by step) -> a three-step solution ending in
  ``\\boxed{14}``, finished by end of sequence;
* anything else                      -> a short generic answer (``finish_reason`` ``length``).

Answers are vLLM-shaped: ``logprobs`` when asked for (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) that spell the text exactly, the ``Yes`` decision token with
the alternatives ``{"Yes": -0.1, "No": -2.4}`` (a sure Yes), or ``{"Yes": -0.6, "No": -0.9}``
(unsure) for a direct judgement of a step that holds :data:`UNSURE_AT_A_GLANCE` or
:data:`UNSURE_AFTER_ANALYSIS`, and for a judgement after the analysis alone of a step that holds
the latter (so the critic's cascade decides such steps at its analysis and its code tier);
``stop_reason`` naming the stop string, the stop string kept in the text only when
``include_stop_str_in_output`` is true, and ``usage``. The answers' JSON is
built once at start-up (per kind, with and without the stop string and logprobs), so a request costs the
server one ``json.loads`` of the body and a few byte joins.

``GET /stats`` answers the counters (``POST /reset`` zeroes them): ``requests`` (completions
only), ``by_kind``, ``max_in_flight`` and ``connections`` (accepted since the reset).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _process

YES_ALTERNATIVES = {"Yes": -0.1, "No": -2.4}
UNSURE_ALTERNATIVES = {"Yes": -0.6, "No": -0.9}
TOKEN_LOGPROB = -0.05
UNSURE_AT_A_GLANCE = "[unsure at a glance]"
"""A step holding this gets an unsure direct judgement (and a sure one after its analysis)."""
UNSURE_AFTER_ANALYSIS = "[unsure after analysis]"
"""A step holding this gets unsure judgements without code (and a sure one after its code)."""

ANALYSIS = (
    "The paragraph multiplies before it adds, as the order of operations requires, and the "
    "product it states agrees with the numbers given in the problem. Nothing in it contradicts an "
    "earlier paragraph, so the step is correct.\n</analyze>\n"
)
CODE = "print(3 * 4)\n```\n"
JUDGEMENT = (
    "The code prints 12, which agrees with the paragraph.\n</verify>\n"
    "<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n"
)
FORCED = "{Yes}$\n</output>\n"
GENERIC = " The answer is 4"
SOLUTION = "Multiply first: 3 * 4 = 12.\n\nThen add: 2 + 12 = 14.\n\nThe answer is $\\boxed{14}$."
EOS = ""
"""The "stop string" of a reply that ends with the end-of-sequence token (no stop string)."""

# kind -> (text including its stop string, the stop string or None for a length finish)
REPLIES: dict[str, tuple[str, str | None]] = {
    "analyze": (ANALYSIS, "</analyze>\n"),
    "verify": (CODE, "\n```\n"),
    "judgement": (JUDGEMENT, "</output>\n"),
    "forced": (FORCED, "</output>\n"),
    "forced_unsure": (FORCED, "</output>\n"),
    "direct": (FORCED, "</output>\n"),
    "direct_unsure": (FORCED, "</output>\n"),
    "solve": (SOLUTION, EOS),
    "generic": (GENERIC, None),
}

# Words with the spaces before them, single punctuation marks, trailing whitespace (as
# critloop.tools.fakes.scripted_tokens splits text).
_PIECES = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^\sA-Za-z0-9_]|\s+$")


def tokens_of(text: str) -> list[str]:
    """Token texts that spell ``text`` exactly."""
    pieces = _PIECES.findall(text)
    if "".join(pieces) != text:  # a corner the regex misses: one character per token
        pieces = list(text)
    return pieces


def _step_of(prompt: str) -> str:
    """The step the prompt asks about: its last user turn (ChatML), else its tail."""
    start = prompt.rfind("<|im_start|>user")
    return prompt[start:] if start >= 0 else prompt[-4096:]


def classify(prompt: str) -> str:
    """Which stage of the GenPRM protocol a prompt asks for (and, for a judgement without code,
    whether the step is scripted as unsure there)."""
    if prompt.endswith("step by step: "):
        return "analyze"
    if prompt.endswith("```python\n"):
        return "verify"
    if prompt.endswith("```\n") and "[Code Output]" in prompt[-4096:]:
        return "judgement"
    if prompt.endswith("\\boxed"):
        step = _step_of(prompt)
        if prompt.endswith("</analyze>\n<output>\n**Judgement**: $\\boxed"):
            return "forced_unsure" if UNSURE_AFTER_ANALYSIS in step else "forced"
        unsure = UNSURE_AT_A_GLANCE in step or UNSURE_AFTER_ANALYSIS in step
        return "direct_unsure" if unsure else "direct"
    if "Please reason step by step" in prompt[-1024:]:
        return "solve"
    return "generic"


def choice_json(
    text: str,
    stop: str | None,
    *,
    include_stop: bool,
    logprobs: bool,
    alternatives: dict[str, float] = YES_ALTERNATIVES,
) -> tuple[bytes, int]:
    """The JSON of one choice and its token count (``alternatives``: the decision token's)."""
    if stop and not include_stop:
        text = text[: -len(stop)]
    tokens = tokens_of(text)
    values, tops, offsets, offset = [], [], [], 0
    for token in tokens:
        if token.strip() == "Yes":
            lead = token[: len(token) - len(token.lstrip())]
            values.append(alternatives["Yes"])
            tops.append({lead + t: v for t, v in alternatives.items()})
        else:
            values.append(TOKEN_LOGPROB)
            tops.append({token: TOKEN_LOGPROB})
        offsets.append(offset)
        offset += len(token)
    choice = {
        "index": 0,
        "text": text,
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        if logprobs
        else None,
        "finish_reason": "stop" if stop is not None else "length",
        "stop_reason": stop or None,
    }
    return json.dumps(choice).encode(), len(tokens)


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_kind: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self.since = time.monotonic()

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_kind": dict(self.by_kind),
            "max_in_flight": self.max_in_flight,
            "connections": self.connections,
            "seconds": time.monotonic() - self.since,
            "pid": os.getpid(),
        }


async def serve(host: str, port: int, announce: Any) -> None:
    stats = Stats()
    # (kind, include_stop, logprobs) -> the JSON of the answer before the usage numbers
    canned: dict[tuple[str, bool, bool], tuple[bytes, int]] = {}
    for kind, (text, stop) in REPLIES.items():
        for include in (False, True):
            for logprobs in (False, True):
                canned[kind, include, logprobs] = choice_json(
                    text,
                    stop,
                    include_stop=include,
                    logprobs=logprobs,
                    alternatives=UNSURE_ALTERNATIVES if kind.endswith("_unsure") else YES_ALTERNATIVES,
                )
    created = int(time.time())

    def answer(status: str, payload: bytes) -> bytes:
        return (
            f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: keep-alive\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        ).encode() + payload

    async def completion(path: str, body: bytes) -> bytes:
        request = json.loads(body)
        prompt = request.get("prompt", "")
        kind = classify(prompt)
        stats.requests += 1
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        delay = 0.0
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "d":
            delay = float(parts[2]) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        choice, completion_tokens = canned[
            kind, bool(request.get("include_stop_str_in_output")), request.get("logprobs") is not None
        ]
        prompt_tokens = max(1, len(prompt) // 4)
        usage = (
            f'{{"prompt_tokens": {prompt_tokens}, "completion_tokens": {completion_tokens}, '
            f'"total_tokens": {prompt_tokens + completion_tokens}}}'
        ).encode()
        model = json.dumps(str(request.get("model", "fake")))
        return (
            (
                f'{{"id": "cmpl-fake-{stats.requests}", "object": "text_completion", "created": {created}, '
                f'"model": {model}, "choices": ['
            ).encode()
            + choice
            + b'], "usage": '
            + usage
            + b"}"
        )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                if method == "POST" and path.endswith("/completions"):
                    stats.in_flight += 1
                    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                    try:
                        response = answer("200 OK", await completion(path, body))
                    finally:
                        stats.in_flight -= 1
                elif method == "GET" and path == "/stats":
                    response = answer("200 OK", json.dumps(stats.as_json()).encode())
                elif method == "POST" and path == "/reset":
                    stats.reset()
                    response = answer("200 OK", b"{}")
                else:
                    response = answer("404 Not Found", b'{"error": "not found"}')
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    # The default listen backlog (100) would drop connections when 128+ clients connect at once.
    server = await asyncio.start_server(handle, host, port, backlog=4096, limit=1 << 22)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    announce(server.sockets[0].getsockname()[1])
    async with server:
        await stop.wait()
    # Leaving `async with` closed the listening socket; asyncio.run cancels the open handlers.


def main() -> None:
    parser = argparse.ArgumentParser(description="fake GenPRM critic server (OpenAI completions)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    def announce(port: int) -> None:
        print(f"PORT {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, announce))


# --------------------------------------------------------------------------- the parent's side


class FakeCriticServer:
    """This file run as a subprocess; :meth:`stop` (or leaving the ``with``) always ends it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> FakeCriticServer:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--host", self.host],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the fake server exited with {self.proc.wait()}")
                if line.startswith("PORT "):
                    self.port = int(line.split()[1])
                    return self
        self.stop()
        raise RuntimeError(f"the fake server did not start within {timeout:g} s")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def base_url(self, delay_ms: float = 0) -> str:
        prefix = f"/d/{delay_ms:g}" if delay_ms else ""
        return f"http://{self.host}:{self.port}{prefix}/v1"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        import httpx

        response = httpx.request(method, f"http://{self.host}:{self.port}{path}", timeout=10.0)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset(self) -> None:
        self._call("POST", "/reset")

    def stop(self) -> int | None:
        """Terminate (then kill) the server; its exit code, None if it never started."""
        if self.proc is None:
            return None
        _process.stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    @property
    def stopped(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def __enter__(self) -> FakeCriticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
