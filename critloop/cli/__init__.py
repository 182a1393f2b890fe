"""The ``critloop`` command line: :data:`app` (Typer) and :func:`main` (the console script).

One module per command group; :mod:`critloop.cli._common` holds what they share, among it the
one mapping from errors to exit codes (:data:`~critloop.cli._common.EXIT_CODES`), applied to
every command by the root group.
"""

from __future__ import annotations

from typing import Annotated

import typer

from critloop.cli import eval as eval_commands
from critloop.cli import models, sandbox, synth
from critloop.cli._common import ExitCodeGroup, console
from critloop.cli.batch import batch, bon
from critloop.cli.report import report
from critloop.cli.serve import serve
from critloop.cli.solve import solve
from critloop.cli.view import view

__all__ = ["app", "main"]

app = typer.Typer(
    name="critloop",
    help="Self-correcting LLM math reasoning.",
    cls=ExitCodeGroup,
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(eval_commands.app, name="eval")
app.add_typer(models.app, name="models")
app.add_typer(synth.app, name="synth")
app.command("solve")(solve)
app.command("batch")(batch)
app.command("bon")(bon)
app.command("report")(report)
app.command("serve")(serve)
app.command("view")(view)


def _print_version(value: bool) -> None:
    if value:
        from critloop import __version__

        console.print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Self-correcting LLM math reasoning."""


def main() -> None:
    """The ``critloop`` console script."""
    app()
