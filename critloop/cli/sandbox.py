"""``critloop sandbox ...``: the Python code sandbox (Docker image, containers)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from critloop.cli._common import choices_help, console, err, one_of
from critloop.errors import ConfigError, CritloopError
from critloop.sandbox.config import SandboxBackendName
from critloop.sandbox.image import BuildRoute

app = typer.Typer(help="The Python code sandbox (Docker image, containers).", no_args_is_help=True)


@app.command("build")
def sandbox_build(
    route: Annotated[
        str,
        typer.Option(
            help=f"{choices_help(BuildRoute)} (dockerfile pulls python:3.12-slim; debootstrap works offline)"
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the sandbox image for this version of critloop."""
    from critloop.sandbox.docker_backend import docker_client
    from critloop.sandbox.image import build_image

    tag = build_image(
        docker_client(),
        route=one_of("--route", route, BuildRoute),
        force=force,
        progress=lambda line: err.print(f"[dim]{line}[/]"),
    )
    console.print(tag)


def _status() -> dict[str, Any]:
    import docker

    from critloop.sandbox.docker_backend import LABEL, _owner_alive, docker_client
    from critloop.sandbox.image import image_tag

    tag = image_tag()
    report: dict[str, Any] = {
        "engine": {"reachable": False},
        "image": {"name": tag, "present": False},
        "containers": [],
    }
    try:
        client = docker_client(timeout=5)
    except CritloopError as exc:
        report["engine"]["error"] = str(exc)
        return report
    report["engine"] = {"reachable": True, "version": client.version().get("Version")}
    try:
        image = client.images.get(tag)
        report["image"].update(present=True, id=image.short_id, size_mb=round(image.attrs["Size"] / 2**20))
    except docker.errors.ImageNotFound:
        pass
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        labels = container.labels
        report["containers"].append(
            {
                "name": container.name,
                "status": container.status,
                "owner_pid": labels.get("io.critloop.owner.pid"),
                "orphan": not _owner_alive(labels),
            }
        )
    return report


@app.command("status")
def sandbox_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Engine, image, and critloop's containers (pools and orphans). Exits 0 only when the
    engine answers and the image exists."""
    report = _status()
    healthy = report["engine"]["reachable"] and report["image"]["present"]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        engine = report["engine"]
        console.print(
            "engine:  "
            + (
                f"[green]reachable[/] (Docker {engine['version']})"
                if engine["reachable"]
                else f"[red]unreachable[/] — {engine.get('error')}"
            )
        )
        image = report["image"]
        console.print(
            f"image:   {image['name']} "
            + (
                f"[green]present[/] ({image['size_mb']} MB)"
                if image["present"]
                else "[red]missing[/] — run `critloop sandbox build`"
            )
        )
        containers = report["containers"]
        orphans = sum(c["orphan"] for c in containers)
        console.print(f"pools:   {len(containers) - orphans} live containers; orphans: {orphans}")
        if containers:
            table = Table("container", "status", "owner pid", "orphan")
            for c in containers:
                table.add_row(c["name"], c["status"], str(c["owner_pid"]), "yes" if c["orphan"] else "")
            console.print(table)
    raise typer.Exit(0 if healthy else 1)


@app.command("clean")
def sandbox_clean(
    everything: Annotated[
        bool, typer.Option("--all", help="Remove every critloop container, not only orphans.")
    ] = False,
) -> None:
    """Remove orphaned sandbox containers (their owner process is gone)."""
    from critloop.sandbox.docker_backend import docker_client, reap_orphans

    report = reap_orphans(docker_client(), everything=everything)
    console.print(f"removed {len(report.removed)} of {report.ours} critloop containers")


@app.command("exec")
def sandbox_exec(
    code: Annotated[str | None, typer.Argument(help="Python code; omit to read --file or stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the code from this file.")] = None,
    backend: Annotated[str, typer.Option(help=choices_help(SandboxBackendName))] = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Run Python code in a fresh sandbox session and print its output."""
    from critloop.sandbox import SandboxConfig, SandboxPool

    if file is not None:
        try:
            source = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    elif code is not None:
        source = code
    elif not sys.stdin.isatty():
        source = sys.stdin.read()
    else:
        raise ConfigError("give the code as an argument, with --file, or on stdin")
    config = SandboxConfig(
        backend=one_of("--backend", backend, SandboxBackendName), pool_size=1, timeout_seconds=timeout
    )

    async def run() -> Any:
        async with SandboxPool(config) as pool, await pool.open_session() as session:
            return await session.exec(source)

    result = asyncio.run(run())
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        text = result.text()
        if text:
            print(text)
    raise typer.Exit(0 if result.ok else 1)
