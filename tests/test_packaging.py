"""The package layout (one namespace, imports pointing one way), and native code built portably."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each top-level folder may import from critloop (besides itself and critloop.errors).
ALLOWED = {
    "sandbox": set(),
    "tools": {"sandbox"},
    "agent": {"tools", "sandbox"},
    "graphs": {"agent", "tools", "sandbox"},
}


def test_folders_import_only_as_critloop_subpackages(tmp_path: Path) -> None:
    code = (
        "import importlib.util, critloop.sandbox, critloop.tools, critloop.agent, critloop.graphs\n"
        "print([importlib.util.find_spec(n) is None for n in ('sandbox', 'tools', 'agent', 'graphs')])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, True, True, True]"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder: str) -> None:
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[0] in ALLOWED:
                    pytest.fail(f"{path.relative_to(ROOT)} imports {name!r}: use critloop.{name}")
                if parts[0] != "critloop" or len(parts) == 1:
                    continue
                target = parts[1]
                if target in (folder, "errors"):
                    continue
                assert target in ALLOWED[folder], f"{path.relative_to(ROOT)} imports up: {name}"


def test_kernel_uses_the_standard_library_only() -> None:
    tree = ast.parse((ROOT / "sandbox" / "kernel.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_image_files_ship_with_the_package() -> None:
    from importlib import resources

    image = resources.files("critloop.sandbox") / "image"
    assert (image / "Dockerfile").is_file()
    assert (image / "build-rootfs.sh").is_file()


def test_llama_cpp_is_built_for_a_portable_baseline() -> None:
    """The Makefile builds llama.cpp with GGML_NATIVE off, for AVX2: its CPU backend holds AVX2
    code and no AVX-512 instruction (a native build on a CPU that has AVX-512 uses its zmm
    registers, and dies on some hypervisors that advertise it)."""
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None, "llama-cpp-python is a dev dependency"
    library = Path(spec.origin).parent / "lib" / "libggml-cpu.so"
    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils) reads the library's instructions"
    code = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "%ymm" in code
    assert "%zmm" not in code
