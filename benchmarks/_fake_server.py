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

A request for ``n`` samples gets that answer ``n`` times (paths without ``/r/``).

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

Replicas with a prefix cache (a SIMULATION of vLLM's automatic prefix caching, for
``bench_routing.py``). The path of a request may name options before ``/v1/...``, as
``/<key>/<value>`` pairs in any order::

    [/d/<ms>][/r/<replica>[/c/<blocks>|/c/inf]]/v1/completions

``/d/<ms>`` is the fixed delay above; ``/r/<replica>`` (a name of letters, digits, ``-`` and
``_``, say ``/r/2`` or ``/r/chain-3-1``) has the request served by that replica, created on its
first request, each replica with a cache of its own; ``/c/<blocks>`` sets that replica's capacity
(in blocks; ``inf``: unbounded) from this request on, evicting down to it, else it keeps the
capacity it has (the ``--cache-blocks`` option of the server when it was created). A request to
a replica:

* tokenizes its prompt with :func:`tokens_of` and hashes each full block of ``--block-size``
  tokens (16) chained to the block before it, as vLLM hashes KV-cache blocks, so that a block's
  hash stands for the whole prefix up to its end (a partial last block is never cached);
* counts as cached the leading blocks the replica holds (all but the last token, at most, as
  vLLM recomputes that one), then holds every block of the prompt (its prefill wrote them) and,
  once answered, every full block of prompt + completion (the KV of the generated tokens stays
  cached too, so that the next call of a critique chain, which extends this prompt and this
  completion, finds them, up to the block where the texts joined split into other tokens);
* evicts the least recently used blocks beyond the capacity; a request touches its blocks tail
  first, so that of one prompt the tail goes before the prefix (vLLM frees a request's blocks
  in that order);
* is answered after ``/d/<ms>`` + ``--prefill-ms-per-token`` (0.05 ms) x uncached prompt tokens
  + ``--decode-ms-per-token`` (10 ms) x completion tokens: what one request costs a 7B model on
  one GPU with a batch that runs every request side by side (no queueing: a replica serves any
  number of requests at once). With ``--serial-prefill``, a replica prefills one request at a
  time (prefill is compute-bound, decode is batched): a request's prefill starts when the
  prefills that came before it on that replica are done, and the wait is added to its delay;
* writes an analysis that begins with ``Sample <n>:``, ``n`` unique to the request, so that the
  chains of one critique diverge from their first generated token, as sampled chains do (all
  else of the answer is the same as without ``/r/``);
* reports ``usage.prompt_tokens`` in the server's tokens and ``usage.prompt_tokens_details.
  cached_tokens``, as vLLM does.

Paths without ``/r/`` are served as before (no cache, no per-token delay). ``GET /stats`` also
answers ``replicas`` (per replica: ``requests``, ``prompt_tokens``, ``cached_prompt_tokens``,
``completion_tokens``, ``max_in_flight``, ``prefill_wait_s`` (the time requests waited for
other requests' prefill, with ``--serial-prefill``), ``blocks`` held, ``capacity_blocks`` (null:
unbounded), ``evicted_blocks``), ``distinct_blocks`` (blocks held by any replica, each counted
once) and ``cache`` (the options). ``POST /reset`` zeroes every replica's counters and keeps
their caches; ``POST /reset?caches=drop`` also forgets every replica (its cache and capacity).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
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


BLOCK_SIZE = 16
"""Tokens per cached block (vLLM's default)."""
CACHE_BLOCKS = 2048
"""A replica's capacity when neither ``--cache-blocks`` nor its path says otherwise."""
PREFILL_MS_PER_TOKEN = 0.05
DECODE_MS_PER_TOKEN = 10.0
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class PrefixCache:
    """One replica's prefix cache: chained hashes of full blocks of tokens, least recently used
    evicted first (``capacity`` None: unbounded)."""

    def __init__(self, capacity: int | None, block_size: int) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.evicted = 0

    def hashes(self, tokens: Sequence[str]) -> list[int]:
        """The hash of each full block, chained: block i's hash covers tokens[: (i + 1) * size]."""
        size, parent, out = self.block_size, 0, []
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash((parent, *tokens[start : start + size]))
            out.append(parent)
        return out

    def hits(self, hashes: Sequence[int]) -> int:
        """How many leading blocks are held."""
        count = 0
        for h in hashes:
            if h not in self.blocks:
                break
            count += 1
        return count

    def hold(self, hashes: Sequence[int]) -> None:
        """Hold these blocks as the most recently used (the first the most recent), then evict."""
        blocks = self.blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        self.shrink()

    def shrink(self) -> None:
        if self.capacity is None:
            return
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
            self.evicted += 1


class Replica:
    """A replica's cache and counters."""

    def __init__(self, capacity: int | None, block_size: int) -> None:
        self.cache = PrefixCache(capacity, block_size)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prefill_wait = 0.0
        self.prefill_free_at = 0.0
        """When the prefills started so far end (event loop time), with serial prefill."""
        self.cache.evicted = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_in_flight": self.max_in_flight,
            "prefill_wait_s": self.prefill_wait,
            "blocks": len(self.cache.blocks),
            "capacity_blocks": self.cache.capacity,
            "evicted_blocks": self.cache.evicted,
        }


class BadPath(ValueError):
    """A request's path names a bad option (answered 400)."""


def path_options(path: str) -> tuple[float, str | None, int | str | None]:
    """The delay (seconds), replica and capacity a request's path names (see the module's
    docstring); the capacity is ``"keep"`` where the path names none, None for ``inf``."""
    parts = path.split("/")
    delay, replica, capacity = 0.0, None, "keep"
    i = 1
    while i + 2 < len(parts) and parts[i] in ("d", "r", "c"):
        key, value = parts[i], parts[i + 1]
        if key == "d":
            try:
                delay = float(value) / 1000.0
            except ValueError:
                raise BadPath(f"bad delay {value!r}") from None
        elif key == "r":
            if not _NAME.fullmatch(value):
                raise BadPath(f"bad replica name {value!r}")
            replica = value
        else:
            capacity = None if value == "inf" else int(value) if value.isdigit() else 0
            if capacity is not None and capacity < 1:
                raise BadPath(f"bad capacity {value!r} (blocks, at least 1, or inf)")
        i += 2
    return delay, replica, capacity


async def serve(
    host: str,
    port: int,
    announce: Any,
    *,
    block_size: int = BLOCK_SIZE,
    cache_blocks: int | None = CACHE_BLOCKS,
    prefill_ms_per_token: float = PREFILL_MS_PER_TOKEN,
    decode_ms_per_token: float = DECODE_MS_PER_TOKEN,
    serial_prefill: bool = False,
) -> None:
    stats = Stats()
    replicas: dict[str, Replica] = {}
    samples = itertools.count(1)
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

    def replica_of(name: str, capacity: int | str | None) -> Replica:
        replica = replicas.get(name)
        if replica is None:
            size = cache_blocks if capacity == "keep" else capacity
            assert not isinstance(size, str)
            replica = replicas[name] = Replica(size, block_size)
        elif capacity != "keep":
            assert not isinstance(capacity, str)
            replica.cache.capacity = capacity
            replica.cache.shrink()
        return replica

    def answer_json(request: dict[str, Any], choice: bytes, usage: bytes) -> bytes:
        """A completion's JSON around one choice's and the usage's."""
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

    async def replica_completion(
        request: dict[str, Any], prompt: str, kind: str, delay: float, replica: Replica
    ) -> bytes:
        """A completion by a replica with a prefix cache (see the module's docstring)."""
        cache = replica.cache
        tokens = tokens_of(prompt) if prompt else []
        hashes = cache.hashes(tokens)
        cached = min(cache.hits(hashes) * block_size, max(0, len(tokens) - 1))
        cache.hold(hashes)  # the prefill wrote them
        include = bool(request.get("include_stop_str_in_output"))
        logprobs = request.get("logprobs") is not None
        text, stop = REPLIES[kind]
        if kind == "analyze":  # the chains diverge here, as sampled ones do
            text = f"Sample {next(samples)}: " + text
            choice, completion_tokens = choice_json(text, stop, include_stop=include, logprobs=logprobs)
        else:
            choice, completion_tokens = canned[kind, include, logprobs]
        written = text[: -len(stop)] if stop and not include else text
        replica.requests += 1
        replica.prompt_tokens += len(tokens)
        replica.cached_prompt_tokens += cached
        replica.completion_tokens += completion_tokens
        replica.in_flight += 1
        replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
        try:
            prefill = prefill_ms_per_token * (len(tokens) - cached) / 1000.0
            if serial_prefill:
                now = asyncio.get_running_loop().time()
                start = max(now, replica.prefill_free_at)
                replica.prefill_free_at = start + prefill
                replica.prefill_wait += start - now
                prefill += start - now
            delay += prefill + decode_ms_per_token * completion_tokens / 1000.0
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            replica.in_flight -= 1
        cache.hold(cache.hashes(tokens_of(prompt + written)))  # the generated tokens' KV too
        usage = (
            f'{{"prompt_tokens": {len(tokens)}, "completion_tokens": {completion_tokens}, '
            f'"total_tokens": {len(tokens) + completion_tokens}, '
            f'"prompt_tokens_details": {{"cached_tokens": {cached}}}}}'
        ).encode()
        return answer_json(request, choice, usage)

    async def completion(path: str, body: bytes) -> bytes:
        request = json.loads(body)
        prompt = request.get("prompt", "")
        kind = classify(prompt)
        stats.requests += 1
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        delay, name, capacity = path_options(path)
        if name is not None:
            return await replica_completion(request, prompt, kind, delay, replica_of(name, capacity))
        if delay > 0:
            await asyncio.sleep(delay)
        choice, completion_tokens = canned[
            kind, bool(request.get("include_stop_str_in_output")), request.get("logprobs") is not None
        ]
        n = int(request.get("n") or 1)
        if n > 1:  # n samples of one prompt: the same answer n times, as vLLM would send them
            first = b'"index": 0'
            choice = b", ".join(choice.replace(first, f'"index": {i}'.encode(), 1) for i in range(n))
            completion_tokens *= n
        prompt_tokens = max(1, len(prompt) // 4)
        usage = (
            f'{{"prompt_tokens": {prompt_tokens}, "completion_tokens": {completion_tokens}, '
            f'"total_tokens": {prompt_tokens + completion_tokens}}}'
        ).encode()
        return answer_json(request, choice, usage)

    def stats_json() -> dict[str, Any]:
        data = stats.as_json()
        held: set[int] = set()
        for replica in replicas.values():
            held.update(replica.cache.blocks)
        data["replicas"] = {name: replica.as_json() for name, replica in replicas.items()}
        data["distinct_blocks"] = len(held)
        data["cache"] = {
            "block_size": block_size,
            "default_capacity_blocks": cache_blocks,
            "prefill_ms_per_token": prefill_ms_per_token,
            "decode_ms_per_token": decode_ms_per_token,
            "serial_prefill": serial_prefill,
        }
        return data

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
                    except BadPath as exc:
                        response = answer("400 Bad Request", json.dumps({"error": str(exc)}).encode())
                    finally:
                        stats.in_flight -= 1
                elif method == "GET" and path == "/stats":
                    response = answer("200 OK", json.dumps(stats_json()).encode())
                elif method == "POST" and path in ("/reset", "/reset?caches=drop"):
                    stats.reset()
                    for replica in replicas.values():
                        replica.reset()
                    if path.endswith("caches=drop"):
                        replicas.clear()
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
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="tokens per cached block")
    parser.add_argument(
        "--cache-blocks",
        default=str(CACHE_BLOCKS),
        help="a new replica's capacity in blocks, or inf (its path's /c/<blocks> overrides it)",
    )
    parser.add_argument("--prefill-ms-per-token", type=float, default=PREFILL_MS_PER_TOKEN)
    parser.add_argument("--decode-ms-per-token", type=float, default=DECODE_MS_PER_TOKEN)
    parser.add_argument(
        "--serial-prefill", action="store_true", help="a replica prefills one request at a time"
    )
    args = parser.parse_args()

    def announce(port: int) -> None:
        print(f"PORT {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.host,
                args.port,
                announce,
                block_size=args.block_size,
                cache_blocks=None if args.cache_blocks == "inf" else int(args.cache_blocks),
                prefill_ms_per_token=args.prefill_ms_per_token,
                decode_ms_per_token=args.decode_ms_per_token,
                serial_prefill=args.serial_prefill,
            )
        )


# --------------------------------------------------------------------------- the parent's side


class FakeCriticServer:
    """This file run as a subprocess; :meth:`stop` (or leaving the ``with``) always ends it.

    The keyword arguments are the server's options for replicas (``cache_blocks`` None:
    unbounded); see the module's docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        block_size: int = BLOCK_SIZE,
        cache_blocks: int | None = CACHE_BLOCKS,
        prefill_ms_per_token: float = PREFILL_MS_PER_TOKEN,
        decode_ms_per_token: float = DECODE_MS_PER_TOKEN,
        serial_prefill: bool = False,
    ) -> None:
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.options = [
            "--block-size", str(block_size),
            "--cache-blocks", "inf" if cache_blocks is None else str(cache_blocks),
            "--prefill-ms-per-token", repr(prefill_ms_per_token),
            "--decode-ms-per-token", repr(decode_ms_per_token),
            *(["--serial-prefill"] if serial_prefill else []),
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> FakeCriticServer:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--host", self.host, *self.options],
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

    def base_url(
        self, delay_ms: float = 0, *, replica: str | int | None = None, cache_blocks: int | str = ""
    ) -> str:
        """The OpenAI base URL with a fixed delay, and served by ``replica`` (whose capacity
        ``cache_blocks`` sets when given: a number of blocks or ``"inf"``)."""
        prefix = f"/d/{delay_ms:g}" if delay_ms else ""
        if replica is not None:
            prefix += f"/r/{replica}"
            if cache_blocks != "":
                prefix += f"/c/{cache_blocks}"
        return f"http://{self.host}:{self.port}{prefix}/v1"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        import httpx

        response = httpx.request(method, f"http://{self.host}:{self.port}{path}", timeout=10.0)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset(self, *, caches: bool = False) -> None:
        """Zero the counters; ``caches``: also forget every replica (its cache and capacity)."""
        self._call("POST", "/reset?caches=drop" if caches else "/reset")

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


def run_against(
    server: FakeCriticServer,
    work: Callable[[], Coroutine[Any, Any, None]],
    failures: list[str],
    checks: dict[str, Any],
    console: Any,
) -> bool:
    """Start ``server``, run ``work()`` to the end, and stop the server whatever happened: an
    error or an interruption is added to ``failures`` (and printed on ``console``), and whether
    the server stopped to ``checks``. Returns whether the run was interrupted (Ctrl-C, SIGTERM)."""
    interrupted = False
    try:
        server.start()
        console.log(f"fake server: pid {server.pid}, port {server.port}")
        asyncio.run(work())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        interrupted = True
        failures.append(f"interrupted ({type(exc).__name__}: {exc})")
        console.print(f"[red]interrupted:[/red] {exc!r}")
    except Exception as exc:  # noqa: BLE001 - print what was measured, then fail
        failures.append(f"{type(exc).__name__}: {exc}")
        console.print_exception()
    finally:
        code = server.stop()
        checks["fake server stopped"] = server.stopped
        checks["fake server exit code"] = code
    return interrupted


if __name__ == "__main__":
    main()
