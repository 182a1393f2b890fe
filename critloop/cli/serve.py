"""``critloop serve``: verified math behind the OpenAI chat API."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.text import Text

from critloop.cli._common import ConfigOption, err, solver_for
from critloop.errors import ConfigError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    config: ConfigOption = None,
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
    import uvicorn

    from critloop.server import ServerSettings, create_app

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env names {api_key_env!r}, but that variable is not set")
    cfg, solver = solver_for(config, {})
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
