"""``critloop solve``: one problem through the self-correcting loop, shown live."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from critloop.agent.critic_protocol import CriticProfile
from critloop.agent.policy import RefineMode
from critloop.cli._common import (
    CascadeOption,
    ConfigOption,
    TauOption,
    cascade_overrides,
    choices_help,
    console,
    err,
    one_of,
    solver_for,
)
from critloop.cli._solve_view import SolveView
from critloop.errors import ConfigError, CritloopError
from critloop.graphs.events import DoneEvent
from critloop.sandbox.config import SandboxBackendName
from critloop.tools.completion import LogprobsMode

if TYPE_CHECKING:
    from critloop.graphs.result import SolveResult


def solve(
    problem: Annotated[str | None, typer.Argument(help="The problem; or use --file.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the problem from this text file.")
    ] = None,
    config: ConfigOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object (progress goes to stderr).")
    ] = False,
    policy_url: Annotated[
        list[str] | None,
        typer.Option(
            help="The policy's OpenAI-compatible base URL (sets kind = openai); repeat it for replicas."
        ),
    ] = None,
    policy_model: Annotated[str | None, typer.Option(help="The policy's model name or path.")] = None,
    critic_url: Annotated[
        list[str] | None,
        typer.Option(
            help="The critic's OpenAI-compatible base URL (sets kind = openai); repeat it for replicas."
        ),
    ] = None,
    critic_model: Annotated[str | None, typer.Option(help="The critic's model name or path.")] = None,
    critic_profile: Annotated[str | None, typer.Option(help=choices_help(CriticProfile))] = None,
    critic_logprobs: Annotated[
        str | None, typer.Option(help=f"What the critic server's logprobs are: {choices_help(LogprobsMode)}.")
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Critique chains per solution (Maj@N).")] = None,
    cascade: CascadeOption = None,
    tau: TauOption = None,
    max_rounds: Annotated[int | None, typer.Option(min=0, help="Refinement rounds at most.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Tokens all roles may generate together.")
    ] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Wall-clock seconds of the run.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help=f"{choices_help(RefineMode)} (step: rewrite the flagged step; full: a new solution)"
        ),
    ] = None,
    sandbox: Annotated[str | None, typer.Option(help=choices_help(SandboxBackendName))] = None,
) -> None:
    """Solve a math problem with the self-correcting loop: policy -> GenPRM critic -> refiner.

    Exits 0 when the loop finished (whatever its stop reason but an error), 1 on an
    infrastructure failure (model endpoint, sandbox), 2 on bad input.
    """
    text = _problem_text(problem, file)
    overrides: dict[str, Any] = {
        "policy.kind": "openai" if policy_url else None,
        "policy.base_url": _urls(policy_url),
        "policy.model": policy_model,
        "critic.kind": "openai" if critic_url else None,
        "critic.base_url": _urls(critic_url),
        "critic.model": critic_model,
        # The config checks the profile, and names its key when it is wrong.
        "critic.profile": critic_profile,
        "critic.logprobs": None
        if critic_logprobs is None
        else one_of("--critic-logprobs", critic_logprobs, LogprobsMode),
        "critic.samples": samples,
        **cascade_overrides(cascade, tau),
        "budget.max_rounds": max_rounds,
        "budget.max_tokens": max_tokens,
        "budget.max_seconds": max_seconds,
        "refine.mode": None if mode is None else one_of("--mode", mode, RefineMode),
        "sandbox.backend": None if sandbox is None else one_of("--sandbox", sandbox, SandboxBackendName),
    }
    live = err if as_json else console
    with live.status("starting: models, tokenizers, sandbox", spinner="dots") as status:
        cfg, solver = solver_for(config, overrides)
        view = SolveView(None if as_json else console, status, max_rounds=cfg.budget.max_rounds)

        async def run() -> SolveResult:
            result: SolveResult | None = None
            async with solver:
                await solver.load_models()
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
                    if isinstance(event, DoneEvent):
                        result = event.result
                    else:
                        view.handle(event)
            assert result is not None
            return result

        result = asyncio.run(run())
    view.result(result)
    if as_json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    if result.stop_reason == "error":
        raise CritloopError(f"the run stopped on an infrastructure failure: {result.error}")


def _urls(given: list[str] | None) -> str | list[str] | None:
    """A URL flag's value for the config: one URL, or the replicas' list."""
    if not given:
        return None
    return given[0] if len(given) == 1 else given


def _problem_text(problem: str | None, file: Path | None) -> str:
    """The problem, from the argument or ``--file``, stripped.

    Raises:
        ConfigError: neither or both are given, the file cannot be read, or the problem is empty.
    """
    if problem is not None and file is not None:
        raise ConfigError("give the problem as an argument or with --file, not both")
    if file is not None:
        try:
            problem = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file} is not UTF-8 text") from None
    if problem is None:
        raise ConfigError(
            'give the problem as an argument (critloop solve "What is 2 + 3 * 4?") or with --file'
        )
    text = problem.strip()
    if not text:
        raise ConfigError(f"the problem is empty{f' ({file})' if file is not None else ''}")
    return text
