"""``critloop view``: a results file as one self-contained HTML page, problem by problem."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from critloop.cli._common import console, err
from critloop.errors import ConfigError

DEFAULT_PORT = 8765


def view(
    results: Annotated[
        Path,
        typer.Argument(
            help="A results file (JSONL) of a batch or bon run, or a `critloop solve --json` result."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The page (default: RESULTS.html, beside the results file)."),
    ] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the page on 127.0.0.1 until Ctrl-C.")] = False,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help=f"With --serve: the port (default {DEFAULT_PORT})."),
    ] = None,
) -> None:
    """Write one HTML page to browse results: the summary and plots, a problem list with filters,
    and each problem's steps coloured by reward, critiques, code runs and rounds.

    The page loads nothing from the network: open it from disk, or with --serve over HTTP.
    """
    from critloop.graphs.view import make_server, write_view

    if port is not None and not serve:
        raise ConfigError("--port needs --serve")
    page = write_view(results, out)
    console.print(f"page: {page}", soft_wrap=True, markup=False)
    if not serve:
        return
    server = make_server(page, DEFAULT_PORT if port is None else port)
    err.print(f"serving http://127.0.0.1:{server.server_port}/ (Ctrl-C stops)", soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped")
    finally:
        server.server_close()
