"""Fixtures for the model layer: the embedded model, the in-process engine, a llama.cpp server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

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


@pytest.fixture(scope="session")
def llama_server(embedded: CachedModel) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) serving the same GGUF."""
    pytest.importorskip(
        "llama_cpp.server", reason="llama-cpp-python[server] is a dev dependency: make test installs it"
    )
    assert embedded.gguf is not None
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(embedded.gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--verbose",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"llama.cpp server exited: {process.stderr.read()[-2000:] if process.stderr else ''}"
                )
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp server did not start within 120 s")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
async def llama_client(llama_server: str) -> AsyncIterator[OpenAICompletionModel]:
    client = OpenAICompletionModel(llama_server, "smollm2", timeout_seconds=120)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def template(embedded: CachedModel) -> ChatTemplate:
    """The embedded model's chat template (its tokenizer), for scripted-model tests."""
    return ChatTemplate.from_pretrained(str(embedded.path))
