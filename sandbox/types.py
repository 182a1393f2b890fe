"""Results of the code sandbox."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["ExecStatus", "ExecResult"]

ExecStatus = Literal["ok", "error", "timeout", "killed"]
"""``ok``: the code ran to the end. ``error``: it raised (the traceback is in ``stderr``).
``timeout``: it ran past its limit and was interrupted or killed. ``killed``: the process died
(``os._exit``, a signal, out of memory) or its kernel was lost."""


class ExecResult(BaseModel):
    """What one run of code produced."""

    model_config = ConfigDict(frozen=True)

    status: ExecStatus
    """How the run ended."""

    stdout: str = ""
    """Everything written to file descriptor 1 (Python, C code and subprocesses alike), capped."""

    stderr: str = ""
    """Everything written to file descriptor 2, capped; tracebacks of errors land here."""

    error: str | None = None
    """A one-line summary when the status is not ``ok``."""

    duration: float = 0.0
    """Seconds the run took, measured by the supervisor."""

    state_survived: bool = True
    """Whether the session's variables from before this run are still there after it. False
    when the worker had to be killed or died: the session goes on in a fresh worker."""

    truncated: bool = False
    """Whether output was cut at the cap."""

    @property
    def ok(self) -> bool:
        """True when the code ran to the end without raising."""
        return self.status == "ok"

    def text(self) -> str:
        """The output as one text: stdout, then stderr, then a status line when not ``ok``."""
        parts = [part.rstrip("\n") for part in (self.stdout, self.stderr) if part]
        if self.status != "ok":
            line = f"[status: {self.status}"
            if self.error:
                line += f": {self.error}"
            if not self.state_survived:
                line += "; session state was lost"
            parts.append(line + "]")
        return "\n".join(parts)
