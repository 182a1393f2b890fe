"""What every command shares: the consoles, the one mapping from errors to exit codes, choices
checked against the ``Literal`` types that define them, and loading the config and the solver."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from critloop.errors import ConfigError, CritloopError

if TYPE_CHECKING:
    from critloop.config import CritloopConfig
    from critloop.graphs.cluster import RayOptions
    from critloop.solver import Solver

__all__ = [
    "EXIT_CODES",
    "CascadeOption",
    "ConfigOption",
    "ExitCodeGroup",
    "RayOption",
    "RayWorkerCpusOption",
    "RayWorkersOption",
    "TauOption",
    "cascade_overrides",
    "check_cascade_flags",
    "choices_help",
    "console",
    "err",
    "exit_code",
    "one_of",
    "print_error",
    "ray_options",
    "solver_for",
]

console = Console()
"""Results (stdout)."""
err = Console(stderr=True)
"""Progress, warnings and errors (stderr)."""

EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: 2,  # bad input: a flag, the config file, a data file
    CritloopError: 1,  # a failure on the way: a model endpoint, the sandbox, a results file
    KeyboardInterrupt: 130,  # Ctrl-C, as a shell reports a SIGINT
}
"""The exit code of each error a command may end with; the nearest class of an error decides.
Any other exception is a bug, and keeps its traceback."""


def exit_code(error: BaseException) -> int | None:
    """The exit code of ``error`` by :data:`EXIT_CODES`; None when it is none of them.

    Example:
        >>> exit_code(ConfigError("bad")), exit_code(CritloopError("down")), exit_code(TypeError())
        (2, 1, None)
    """
    return next((EXIT_CODES[kind] for kind in type(error).__mro__ if kind in EXIT_CODES), None)


def print_error(message: str) -> None:
    """``error: message`` on stderr."""
    # Plain text (a message may hold brackets), never wrapped (paths and URLs stay whole).
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


class ExitCodeGroup(TyperGroup):
    """The root command group: every command runs inside it, so that every error a command
    ends with is printed and mapped to its exit code here, by :data:`EXIT_CODES`."""

    def invoke(self, ctx: Any) -> Any:  # ctx: the Context of typer's own copy of click
        try:
            return super().invoke(ctx)
        except tuple(EXIT_CODES) as error:
            code = exit_code(error)
            assert code is not None  # the error is an instance of one of EXIT_CODES' classes
            if not isinstance(error, KeyboardInterrupt):  # the user knows: no message, as a shell does
                print_error(str(error))
            raise typer.Exit(code) from None


def one_of(flag: str, value: str, choices: Any, *more: str) -> Any:
    """``value``, when it is one of the ``Literal`` alias ``choices`` (or of ``more``).

    Raises:
        ConfigError: it is not (``--mode must be step or full, not 'rewrite'``).
    """
    allowed = (*get_args(choices), *more)
    if value not in allowed:
        either = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise ConfigError(f"{flag} must be {either}, not {value!r}")
    return value


def choices_help(choices: Any, *more: str) -> str:
    """The values of the ``Literal`` alias ``choices`` (and ``more``) for an option's help:
    ``step | full``."""
    return " | ".join((*get_args(choices), *more))


ConfigOption = Annotated[Path | None, typer.Option("--config", help="critloop.toml")]
CascadeOption = Annotated[
    bool | None,
    typer.Option(
        "--cascade/--no-cascade",
        help="Critique each step in tiers, the cheapest first: a direct judgement, then an analysis, "
        "then code, stopping at the first sure one (default: \\[critic] cascade, off).",
    ),
]
TauOption = Annotated[
    float | None,
    typer.Option(
        max=0.5,
        help="With --cascade: a tier is sure when its reward is within this of 0 or 1 (default 0.1).",
    ),
]


def cascade_overrides(cascade: bool | None, tau: float | None) -> dict[str, Any]:
    """The config keys ``--cascade`` and ``--tau`` set."""
    return {"critic.cascade": cascade, "critic.tau": tau}


def check_cascade_flags(cfg: CritloopConfig, tau: float | None) -> None:
    """Refuse ``--tau`` when the cascade it tunes is off.

    Raises:
        ConfigError: ``--tau`` was given and the cascade is off.
    """
    if tau is not None and not cfg.critic.cascade:
        raise ConfigError(
            "--tau tunes the cascade, which is off: add --cascade (or cascade = true in [critic])"
        )


def solver_for(config: Path | None, overrides: dict[str, Any]) -> tuple[CritloopConfig, Solver]:
    """The config (file and flags) and its solver.

    Raises:
        ConfigError: the config or a flag is wrong (the message names it).
    """
    from critloop.config import load_config
    from critloop.solver import Solver

    cfg = load_config(config, overrides)
    check_cascade_flags(cfg, overrides.get("critic.tau"))
    return cfg, Solver.from_config(cfg)


RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on a Ray cluster (pip install 'critloop\\[ray]'): `local` starts one on this machine, "
        "`auto` joins the cluster this machine is part of (ray start), HOST:PORT joins that head. "
        "--concurrency then counts per worker.",
    ),
]
RayWorkersOption = Annotated[
    int | None, typer.Option("--ray-workers", min=1, help="With --ray: workers (default: one per node).")
]
RayWorkerCpusOption = Annotated[
    float,
    typer.Option("--ray-worker-cpus", min=0.01, help="With --ray: CPUs each worker reserves in Ray."),
]


def ray_options(address: str | None, workers: int | None, worker_cpus: float) -> RayOptions | None:
    """The Ray options of ``--ray``, ``--ray-workers`` and ``--ray-worker-cpus``; None without ``--ray``.

    Raises:
        ConfigError: a ``--ray-*`` flag without ``--ray``, or an address ``--ray`` does not take.
    """
    from critloop.graphs.cluster import RayOptions

    if address is None:
        if workers is not None or worker_cpus != 1.0:
            raise ConfigError("--ray-workers and --ray-worker-cpus need --ray")
        return None
    return RayOptions(address=address, workers=workers, worker_cpus=worker_cpus)
