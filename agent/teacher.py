"""The teacher: a strong model that critiques a whole solution paragraph by paragraph, verifying
each paragraph with Python code that runs in the sandbox, and names the earliest wrong paragraph.

Its critiques are the rationales of GenPRM-style training data (``critloop synth``): the analysis
and the code verification of each paragraph become the assistant turns a critic learns from.

The teacher sees the problem and the solution's paragraphs, tagged and numbered from 1. For each
paragraph it writes ``### Paragraph N``, an ``<analyze>`` part and a ``<verify>`` part with a
Python block; generation stops when a block closes, the block runs in the sample's own sandbox
session (so later blocks see earlier variables), and its output is fed back after
``[Code Output]`` before generation goes on. The last ``\\boxed{N}`` is its answer: the earliest
wrong paragraph, or -1.

Example:
    >>> teacher = Teacher(model, template, sandbox=pool, samples=4)  # doctest: +SKIP
    >>> critiques = await teacher.critique(problem, steps)  # doctest: +SKIP
    >>> [c.vote for c in critiques]  # doctest: +SKIP
    [1, 1, -1, 1]
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from critloop.agent._critique import CodeRun, shown_output
from critloop.agent.critic_protocol import CODE_FENCE_STOP, CODE_MISSING, CODE_OUTPUT
from critloop.agent.steps import extract_answer
from critloop.errors import ModelError
from critloop.tools._concurrency import all_or_nothing
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionModel, ModelUsage, SamplingParams
from critloop.tools.tracing import traced_complete, traced_exec

if TYPE_CHECKING:
    from critloop.sandbox import SandboxPool, Session

__all__ = ["TEACHER_PROMPT", "Rationale", "Teacher", "TeacherCritique", "rationales", "read_vote"]

TEACHER_PROMPT = (
    "Below are a math problem and a solution to it, split into paragraphs. Each paragraph is "
    "wrapped in tags and numbered from 1.\n\n"
    "[Problem]\n{problem}\n\n"
    "[Solution]\n{paragraphs}\n\n"
    "Check the solution paragraph by paragraph. Begin the check of each paragraph with the line "
    "`### Paragraph N`, then write two parts:\n"
    "1. `<analyze>...</analyze>`: reason through the paragraph and explain in detail whether it "
    "is right or wrong.\n"
    "2. `<verify>...</verify>`: a ```python block that checks every detail of the paragraph code "
    "can check (computations, equations, substitutions) and prints what it finds. The code is run "
    "and its output is shown to you after `[Code Output]`; comment on it before you close the "
    "part. All blocks run in one Python session, so a block can use the variables of earlier ones.\n\n"
    "When every paragraph is checked, give the number of the earliest paragraph that contains an "
    "error, or -1 if none does, as $\\boxed{{N}}$."
)
"""The teacher's user turn: ``{problem}`` and ``{paragraphs}`` (see :func:`tagged_paragraphs`)."""

_PYTHON_BLOCK = re.compile(r"```python[ \t]*\n(.*?)\n```\n$", re.DOTALL)
_SECTION = re.compile(r"^#+\s*Paragraph\s+(\d+)\b.*$", re.MULTILINE | re.IGNORECASE)
_ANALYZE = re.compile(r"<analyze>\s*(.*?)\s*</analyze>", re.DOTALL)
_VERIFY = re.compile(r"<verify>\s*(.*?)\s*</verify>", re.DOTALL)


def tagged_paragraphs(steps: Sequence[str]) -> str:
    """The steps as the teacher sees them: ``<paragraph_1>`` ... ``</paragraph_1>``, one after another."""
    return "\n".join(f"<paragraph_{k}>\n{step}\n</paragraph_{k}>" for k, step in enumerate(steps, 1))


def read_vote(text: str, steps: int) -> int | None:
    """The teacher's answer as a 0-based step index (-1: no wrong step), from the last
    ``\\boxed{N}`` of its critique; None when there is none, or it names no paragraph.

    >>> read_vote("... so $\\\\boxed{2}$", 3), read_vote("$\\\\boxed{-1}$", 3), read_vote("$\\\\boxed{7}$", 3)
    (1, -1, None)
    """
    answer = extract_answer(text)
    try:
        number = int((answer or "").strip().strip("$"))
    except ValueError:
        return None
    if number == -1:
        return -1
    return number - 1 if 1 <= number <= steps else None


class Rationale(BaseModel):
    """What the teacher wrote about one paragraph."""

    model_config = ConfigDict(frozen=True)

    analysis: str
    """The text of its ``<analyze>`` part."""
    verification: str
    """The text of its ``<verify>`` part (code blocks with their ``[Code Output]``), stripped;
    empty when it wrote none."""


def rationales(text: str) -> dict[int, Rationale]:
    """The teacher's rationale of each paragraph, by 0-based step index: the ``<analyze>`` and
    ``<verify>`` parts under each ``### Paragraph N`` heading. A paragraph whose section has no
    closed ``<analyze>`` is missing (a later section with the same number does not replace it).

    >>> text = "### Paragraph 1\\n<analyze>\\nFine.\\n</analyze>\\n<verify>\\nNone needed.\\n</verify>"
    >>> rationales(text)[0].analysis
    'Fine.'
    """
    found: dict[int, Rationale] = {}
    headings = list(_SECTION.finditer(text))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        body = text[heading.end() : following.start() if following else len(text)]
        index = int(heading.group(1)) - 1
        analysis = _ANALYZE.search(body)
        if index < 0 or index in found or analysis is None:
            continue
        verification = _VERIFY.search(body, analysis.end())
        found[index] = Rationale(
            analysis=analysis.group(1), verification=verification.group(1) if verification else ""
        )
    return found


class TeacherCritique(BaseModel):
    """One sample of the teacher's critique of a solution."""

    model_config = ConfigDict(frozen=True)

    text: str
    """The whole critique, the code outputs fed back included."""
    vote: int | None
    """The earliest wrong step it names (0-based; -1: none); None when it named none it could."""
    finish_reason: str
    """``stop`` (it ended), ``length`` (its token limit) or ``code_runs`` (its code-run limit)."""
    code_runs: tuple[CodeRun, ...] = ()
    usage: ModelUsage = ModelUsage()


class Teacher:
    """Critiques whole solutions with code, several samples each (see the module's docstring).

    Args:
        model: the teacher's completion model (QwQ-32B in the GenPRM paper; any model served
            through an OpenAI-compatible endpoint, or in process).
        template: its chat template.
        sandbox: where its code runs: one session per sample. None: the code is not run, and
            the teacher is told so after each block.
        sampling: its sampling parameters (``max_tokens`` bounds a whole sample).
        samples: independent critiques per solution.
        code_runs: code blocks run at most per sample; the sample ends at this limit.
        code_timeout_seconds: the limit of one code run.
        max_code_output_chars: output shown after ``[Code Output]`` is cut to this.
        gate: a semaphore every model call holds (the caller's limit of requests in flight).
    """

    def __init__(
        self,
        model: CompletionModel,
        template: ChatTemplate,
        *,
        sandbox: SandboxPool | None,
        sampling: SamplingParams,
        samples: int = 4,
        code_runs: int = 16,
        code_timeout_seconds: float = 5.0,
        max_code_output_chars: int = 2000,
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.model = model
        self.template = template
        self.sandbox = sandbox
        self.sampling = sampling
        self.samples = samples
        self.code_runs = code_runs
        self.code_timeout_seconds = code_timeout_seconds
        self.max_code_output_chars = max_code_output_chars
        self.gate: contextlib.AbstractAsyncContextManager[Any] = gate or contextlib.nullcontext()

    def prompt(self, problem: str, steps: Sequence[str]) -> str:
        """The raw prompt of a critique: the teacher's turn, and the assistant's turn opened."""
        turn = TEACHER_PROMPT.format(problem=problem, paragraphs=tagged_paragraphs(steps))
        return self.template.render([{"role": "user", "content": turn}], add_generation_prompt=True)

    async def critique(self, problem: str, steps: Sequence[str]) -> list[TeacherCritique]:
        """``samples`` independent critiques of the solution ``steps``, written concurrently."""
        prompt = self.prompt(problem, steps)
        return await all_or_nothing([self._sample(prompt, len(steps)) for _ in range(self.samples)])

    async def _sample(self, prompt: str, steps: int) -> TeacherCritique:
        text = ""
        runs: list[CodeRun] = []
        usage = ModelUsage()
        budget = self.sampling.max_tokens
        session: Session | None = None
        finish = "stop"
        try:
            while True:
                params = self.sampling.model_copy(
                    update={"stop": (CODE_FENCE_STOP,), "include_stop": True, "max_tokens": budget, "n": 1}
                )
                async with self.gate:
                    try:
                        result = await traced_complete(self.model, prompt + text, params, role="teacher")
                    except ModelError as error:
                        error.role = error.role or "teacher"
                        raise
                written = result.choices[0]
                usage += ModelUsage(
                    calls=1, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
                )
                text += written.text
                budget -= max(1, written.completion_tokens)
                if written.finish_reason == "length" or budget < 1:
                    finish = "length"
                    break
                if written.stop is None:
                    break  # the model ended its turn
                block = _PYTHON_BLOCK.search(written.text)
                if block is None:
                    continue  # a fence that closed no Python block: go on writing
                if len(runs) == self.code_runs:
                    finish = "code_runs"
                    break
                if session is None and self.sandbox is not None:
                    session = await self.sandbox.open_session()
                run = await self._run(session, block.group(1).strip())
                runs.append(run)
                output = CODE_OUTPUT.format(output=run.output)
                text += output
                budget -= self.template.count_tokens(output)
        finally:
            if session is not None:
                session.release()
        return TeacherCritique(
            text=text, vote=read_vote(text, steps), finish_reason=finish, code_runs=tuple(runs), usage=usage
        )

    async def _run(self, session: Session | None, code: str) -> CodeRun:
        if not code:
            return CodeRun(code="", output=CODE_MISSING, status="missing")
        if session is None:
            return CodeRun(code=code, output="(code is not run: no sandbox)", status="missing")
        result = await traced_exec(session, code, timeout=self.code_timeout_seconds)
        return CodeRun(
            code=code, output=shown_output(result, self.max_code_output_chars), status=result.status
        )
