"""The GenPRM critic: per-step critiques with analysis, sandboxed code and a Yes/No reward.

Example:
    >>> critic = GenPRMCritic(model, template, pool, CriticConfig(samples=8))  # doctest: +SKIP
    >>> async with critic.run("What is 2 + 3 * 4?") as run:  # doctest: +SKIP
    ...     report = await run.critique(["3 * 4 = 12.", "2 + 12 = 15."])
    ...     report.first_error  # 1: the second step is wrong
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from critloop.agent.critic_protocol import (
    ANALYZE_PREFIX,
    ANALYZE_STOP,
    CODE_ERROR,
    CODE_FENCE_STOP,
    CODE_MISSING,
    CODE_OUTPUT,
    CODE_TIMEOUT,
    DEFAULT_FIRST_STEP_FORMAT,
    FORCED_JUDGEMENT,
    OUTPUT_PREFIX,
    OUTPUT_STOP,
    VERIFY_PREFIX,
    CriticProfile,
    conversation,
)
from critloop.agent.verdict import RewardSource, Segment, Verdict, find_verdict, reward_for, segment_after
from critloop.errors import ConfigError
from critloop.sandbox import SandboxPool, Session
from critloop.tools._concurrency import all_or_nothing
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionModel, CompletionResult, ModelUsage, SamplingParams
from critloop.tools.endpoint import EndpointConfig

__all__ = [
    "ChainCritique",
    "CodeRun",
    "CriticConfig",
    "CritiqueReport",
    "CritiqueRun",
    "GenPRMCritic",
    "ScanMode",
    "StepReport",
]

ScanMode = Literal["first_error", "all"]
"""``first_error``: critique steps in order and stop at the first flagged one (the refine loop,
ProcessBench). ``all``: score every step (Best-of-N ranking, full reports)."""

_T = TypeVar("_T")
_CODE_BLOCK = re.compile(r"```python\s*(.*?)\s*```", re.DOTALL)


class CriticConfig(EndpointConfig):
    """The ``[critic]`` table: the endpoint, with GenPRM's sampling defaults, and the critic's options.

    Example:
        >>> CriticConfig(samples=8).temperature
        0.6
    """

    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=20, ge=-1)
    profile: CriticProfile = "genprm"
    """``genprm`` for GenPRM checkpoints; ``instruct`` to teach the format to a general model."""
    samples: int = Field(default=1, ge=1, le=64)
    """Maj@N: independent critique chains per solution; the step reward is their mean."""
    threshold: float = Field(default=0.5, ge=0, le=1)
    """A step is flagged when its mean reward is below this."""
    code_rounds: int = Field(default=3, ge=0, le=10)
    """Most generation rounds of the verify stage (0 disables code verification)."""
    max_critique_tokens: int = Field(default=2048, ge=64)
    """A critique past this many tokens falls back to a forced judgement."""
    forced_judgement_tokens: int = Field(default=20, ge=1)
    logprobs: int = Field(default=20, ge=1, le=20)
    """Top-k logprobs asked for at the stages that can hold the judgement (the reward needs the
    decision token's); the analysis stage asks for none."""
    first_step_format: str = DEFAULT_FIRST_STEP_FORMAT
    code_timeout_seconds: float = Field(default=5.0, gt=0)
    max_code_output_chars: int = Field(default=2000, ge=100)
    """Code output shown to the critic is cut to this (with a marker)."""

    @model_validator(mode="after")
    def _instruct_for_the_embedded_model(self) -> CriticConfig:
        # The embedded SmolLM2 is no GenPRM checkpoint: unless told otherwise, teach it the format.
        if self.kind == "embedded" and "profile" not in self.model_fields_set:
            object.__setattr__(self, "profile", "instruct")
        return self


class CodeRun(BaseModel):
    """One code block the critic wrote and what running it gave."""

    model_config = ConfigDict(frozen=True)

    code: str
    output: str
    """What the critic was shown after ``[Code Output]``."""
    status: str
    """The sandbox status (``ok``, ``error``, ``timeout``, ``killed``) or ``missing``."""


class ChainCritique(BaseModel):
    """One chain's critique of one step."""

    model_config = ConfigDict(frozen=True)

    text: str
    verdict: Verdict
    reward: float
    reward_source: RewardSource
    forced: bool
    """The limits were hit and the judgement was forced from the analysis alone."""
    code_runs: tuple[CodeRun, ...] = ()
    usage: ModelUsage = ModelUsage()


class StepReport(BaseModel):
    """The critic's report on one step."""

    model_config = ConfigDict(frozen=True)

    index: int
    """0-based index of the step (the critique calls it Paragraph ``index + 1``)."""
    reward: float
    """Mean reward over the chains."""
    flagged: bool
    verdicts: dict[str, int]
    """How many chains said ``yes``, ``no``, ``none``."""
    chains: tuple[ChainCritique, ...]
    reused: bool = False
    """Carried over from an earlier critique of the same prefix (no model call)."""


class CritiqueReport(BaseModel):
    """What the critic found in a solution. JSON-serialisable."""

    model_config = ConfigDict(frozen=True)

    problem: str
    steps: tuple[str, ...]
    scan: ScanMode
    samples: int
    threshold: float
    step_reports: tuple[StepReport, ...]
    """Reports of the steps critiqued (with ``first_error``: up to the first flagged one)."""
    usage: ModelUsage
    """Model usage of this call (reused steps cost nothing)."""

    @property
    def first_error(self) -> int | None:
        """0-based index of the first flagged step, or None when every critiqued step passed."""
        return next((s.index for s in self.step_reports if s.flagged), None)

    @property
    def all_pass(self) -> bool:
        return len(self.step_reports) == len(self.steps) and self.first_error is None

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.step_reports]


class _Chain:
    """One critique chain of a run: its history of critiques and its sandbox sessions."""

    def __init__(self) -> None:
        self.critiques: list[ChainCritique] = []
        self.session: Session | None = None
        # A session still opening: it opens while the first analysis is generated, off the
        # critical path, and is awaited only when the critique first runs code.
        self.opening: asyncio.Task[Session] | None = None
        # snapshots[j]: a fork of the session's state after j steps; None at j = 0 (a fresh
        # session opens instead: cheaper than a fork) and after a step no rewind can target
        # (a fresh session then stands in). Forks are what a batch's sandbox spends most on,
        # so they are taken lazily: ``unforked`` holds the indices of snapshots the working
        # session itself still stands for (it has run no code since), forked only before the
        # session next runs code: never after the last step, nor for steps without code.
        self.snapshots: list[Session | None] = []
        self.unforked: list[int] = []

    @property
    def has_sandbox(self) -> bool:
        return self.session is not None or self.opening is not None

    async def ready(self) -> Session:
        if self.opening is not None:
            task, self.opening = self.opening, None
            self.session = await task
        assert self.session is not None
        return self.session

    def snapshot(self) -> None:
        """Mark the working session's current state as the state after the latest step."""
        self.unforked.append(len(self.snapshots))
        self.snapshots.append(None)

    async def before_exec(self) -> Session:
        """The working session, once the snapshot it still stands for (if any) is forked."""
        session = await self.ready()
        while self.unforked:
            self.snapshots[self.unforked[0]] = await session.fork()
            del self.unforked[0]
        return session

    async def rewind(self, keep: int, sandbox: SandboxPool | None) -> None:
        """Forget everything after ``keep`` steps; the working session restarts from there."""
        del self.critiques[keep:]
        if keep in self.unforked:
            # The working session has run no code since that step: it is the state wanted.
            del self.snapshots[keep + 1 :]
            self.unforked = [j for j in self.unforked if j <= keep]
            return
        self.unforked = []
        if self.opening is not None:
            await self.ready()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if keep < len(self.snapshots):
            for snapshot in self.snapshots[keep + 1 :]:
                if snapshot is not None:
                    await snapshot.close()
            del self.snapshots[keep + 1 :]
            base = self.snapshots[keep]
            if base is not None:
                self.session = await base.fork()
            elif sandbox is not None:
                self.session = await sandbox.open_session()

    async def close(self) -> None:
        if self.opening is not None:
            with contextlib.suppress(Exception):
                await self.ready()
        for session in [self.session, *self.snapshots]:
            if session is not None:
                await session.close()
        self.session, self.snapshots, self.unforked = None, [], []

    def release(self) -> None:
        """Close without waiting (:meth:`Session.release`); a session still opening is
        released when it arrives."""
        if self.opening is not None:
            self.opening.add_done_callback(_release_opened)
            self.opening = None
        for session in [self.session, *self.snapshots]:
            if session is not None:
                session.release()
        self.session, self.snapshots, self.unforked = None, [], []


def _release_opened(task: asyncio.Task[Session]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()


class GenPRMCritic:
    """Critiques solutions step by step with the GenPRM protocol (``critic_protocol``).

    Args:
        model: the critic's completion model (a GenPRM checkpoint on vLLM, or any model with
            the ``instruct`` profile).
        template: the critic's chat template (raw prompts are built from it).
        sandbox: where the critic's code runs; None disables code verification.
        config: options (see :class:`CriticConfig`).
    """

    def __init__(
        self,
        model: CompletionModel,
        template: ChatTemplate,
        sandbox: SandboxPool | None,
        config: CriticConfig | None = None,
    ) -> None:
        self.model = model
        self.template = template
        self.sandbox = sandbox
        self.config = config or CriticConfig()
        tokenizer = template.tokenizer
        self._yes_ids = frozenset(_word_ids(tokenizer, "Yes"))
        self._no_ids = frozenset(_word_ids(tokenizer, "No"))

    @classmethod
    def from_config(cls, config: CriticConfig, sandbox: SandboxPool | None) -> GenPRMCritic:
        from critloop.tools.endpoint import build_completion_model

        return cls(
            build_completion_model(config),
            ChatTemplate.from_pretrained(config.tokenizer_ref),
            sandbox,
            config,
        )

    def run(self, problem: str, *, keep_snapshots: bool = True) -> CritiqueRun:
        """A critique run over one problem: call :meth:`CritiqueRun.critique` as the solution
        changes; unchanged prefixes are reused. Use as ``async with``."""
        return CritiqueRun(self, problem, keep_snapshots=keep_snapshots)

    async def critique(
        self,
        problem: str,
        steps: Sequence[str],
        *,
        scan: ScanMode = "first_error",
        samples: int | None = None,
    ) -> CritiqueReport:
        """Critique a solution once (no reuse across calls)."""
        run = self.run(problem, keep_snapshots=False)
        try:
            return await run.critique(steps, scan=scan, samples=samples)
        finally:
            # The report is ready: the sandbox clean-up need not delay it.
            run.release()

    # ------------------------------------------------------------------ one chain, one step

    def _params(self, *, logprobs: bool = True, **kwargs: object) -> SamplingParams:
        cfg = self.config
        return cfg.sampling(logprobs=cfg.logprobs if logprobs else None, include_stop=True, **kwargs)

    async def _critique_step(self, problem: str, steps: Sequence[str], chain: _Chain) -> ChainCritique:
        cfg = self.config
        k = len(chain.critiques) + 1
        started = time.perf_counter()
        prompt = self.template.render(
            conversation(
                problem,
                steps,
                [c.text for c in chain.critiques],
                profile=cfg.profile,
                first_step_format=cfg.first_step_format,
            )
        )
        usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # Tokens of the critique so far, kept as a running sum (the model's own counts plus
        # ours of the text the protocol inserts) rather than re-tokenizing the growing text.
        spent = 0

        async def complete(text: str, params: SamplingParams) -> CompletionResult:
            nonlocal spent
            result = await self.model.complete(prompt + text, params)
            usage["calls"] += 1
            usage["prompt_tokens"] += result.prompt_tokens
            usage["completion_tokens"] += result.completion_tokens
            choice = result.choices[0]
            spent += choice.completion_tokens or self.template.count_tokens(choice.text)
            return result

        def insert(piece: str) -> str:
            nonlocal spent
            spent += self.template.count_tokens(piece)
            return piece

        text = insert(ANALYZE_PREFIX.format(k=k))
        segments: list[Segment] = []
        budget = cfg.max_critique_tokens - spent
        # The analysis ends before any judgement: its tokens' logprobs (often the longest
        # stretch, with top-k alternatives each) would be parsed only to be dropped.
        first = await complete(
            text, self._params(stop=(ANALYZE_STOP,), max_tokens=max(1, budget), logprobs=False)
        )
        analysis = first.choices[0]
        segments.append(segment_after(text, analysis.text, analysis.tokens))
        text += analysis.text
        code_runs: list[CodeRun] = []
        finished = False
        verify = cfg.code_rounds > 0 and chain.has_sandbox
        if analysis.stop == ANALYZE_STOP and not verify:
            # No code verification: straight from the analysis to the judgement.
            text += OUTPUT_PREFIX
            result = await complete(
                text, self._params(stop=(OUTPUT_STOP,), max_tokens=cfg.forced_judgement_tokens)
            )
            choice = result.choices[0]
            segments.append(segment_after(text, choice.text, choice.tokens))
            text += choice.text
            finished = True
        elif analysis.stop == ANALYZE_STOP:
            text += insert(VERIFY_PREFIX)
            for _round in range(cfg.code_rounds):
                left = cfg.max_critique_tokens - spent
                if left <= 0:
                    break
                result = await complete(
                    text, self._params(stop=(CODE_FENCE_STOP, OUTPUT_STOP), max_tokens=left)
                )
                choice = result.choices[0]
                segments.append(segment_after(text, choice.text, choice.tokens))
                text += choice.text
                if choice.stop == OUTPUT_STOP:
                    finished = True
                    break
                if choice.stop != CODE_FENCE_STOP:
                    # The model ended (end of sequence or length) without closing its judgement.
                    finished = choice.finish_reason == "stop" and find_verdict(text)[0] != "none"
                    break
                run = await self._run_code(text, chain)
                code_runs.append(run)
                text += insert(CODE_OUTPUT.format(output=run.output))
        forced = not finished
        if forced:
            # The analysis alone, then the judgement (reference fallback).
            text = ANALYZE_PREFIX.format(k=k) + analysis.text.split("</analyze>")[0] + FORCED_JUDGEMENT
            result = await complete(
                text, self._params(stop=(OUTPUT_STOP,), max_tokens=cfg.forced_judgement_tokens)
            )
            choice = result.choices[0]
            segments = [segment_after(text, choice.text, choice.tokens)]
            text += choice.text
        verdict, offset = find_verdict(text)
        reward, source = reward_for(verdict, offset, segments, yes_ids=self._yes_ids, no_ids=self._no_ids)
        return ChainCritique(
            text=text,
            verdict=verdict,
            reward=reward,
            reward_source=source,
            forced=forced,
            code_runs=tuple(code_runs),
            usage=ModelUsage(**usage, seconds=time.perf_counter() - started),
        )

    async def _run_code(self, critique: str, chain: _Chain) -> CodeRun:
        blocks = _CODE_BLOCK.findall(critique)
        if not blocks or not blocks[-1].strip():
            return CodeRun(code="", output=CODE_MISSING, status="missing")
        code = blocks[-1].strip()
        session = await chain.before_exec()
        result = await session.exec(code, timeout=self.config.code_timeout_seconds)
        output = result.stdout.strip()
        if result.status == "timeout":
            output = CODE_TIMEOUT
        elif result.status != "ok":
            error = CODE_ERROR.format(error=result.error or result.status)
            output = f"{output}\n{error}" if output else error
        limit = self.config.max_code_output_chars
        if len(output) > limit:
            output = output[:limit] + f"\n... ({len(output) - limit} more characters not shown)"
        return CodeRun(code=code, output=output, status=result.status)


class CritiqueRun:
    """The critic's state for one problem: each chain's critiques and sandbox sessions.

    Calling :meth:`critique` again with a changed solution re-critiques from the first changed
    step: the critiques of the unchanged prefix are reused with no model call, and each chain's
    sandbox continues from a snapshot of its state after that prefix.
    """

    def __init__(self, critic: GenPRMCritic, problem: str, *, keep_snapshots: bool) -> None:
        self.critic = critic
        self.problem = problem
        self.keep_snapshots = keep_snapshots
        self._chains: list[_Chain] = []
        self._steps: list[str] = []
        self._reports: list[StepReport] = []
        self._closed = False

    async def __aenter__(self) -> CritiqueRun:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every chain's sandbox sessions, waiting until they are gone."""
        self._closed = True
        await asyncio.gather(*(chain.close() for chain in self._chains), return_exceptions=True)
        self._chains = []

    def release(self) -> None:
        """Close without waiting: the sessions are killed in the background, tracked by the
        pool (:meth:`SandboxPool.close` waits for them)."""
        self._closed = True
        for chain in self._chains:
            chain.release()
        self._chains = []

    def adopt(self, report: CritiqueReport) -> None:
        """Continue from an earlier report (say, one restored from a checkpoint in a new process):
        its steps' critiques are reused as if this run had made them. Sandbox state is not part
        of a report: the chains' sessions start fresh, so code of later steps cannot see
        variables that code of earlier steps defined."""
        if self._closed:
            raise ConfigError("this critique run is closed")
        self.release()
        self._closed = False
        self._chains = [_Chain() for _ in range(report.samples)]
        for i, chain in enumerate(self._chains):
            chain.critiques = [step.chains[i] for step in report.step_reports if i < len(step.chains)]
        self._steps = list(report.steps[: len(report.step_reports)])
        self._reports = list(report.step_reports)

    async def critique(
        self,
        steps: Sequence[str],
        *,
        scan: ScanMode = "first_error",
        samples: int | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> CritiqueReport:
        """Critique ``steps`` (reusing what is unchanged since the last call).

        Args:
            steps: the solution's steps.
            scan: ``first_error`` stops at the first flagged step; ``all`` scores every step.
            samples: Maj@N chains (default: the config's ``samples``).
            on_step: called with each newly critiqued step's report as soon as it is ready.
        """
        if self._closed:
            raise ConfigError("this critique run is closed")
        steps = list(steps)
        if not steps:
            raise ValueError("a solution needs at least one step to critique")
        critic, cfg = self.critic, self.critic.config
        n = samples or cfg.samples
        if len(self._chains) != n:
            await self.aclose()
            self._closed = False
            self._chains = [_Chain() for _ in range(n)]
            self._steps, self._reports = [], []
        same = 0
        while same < min(len(steps), len(self._steps)) and steps[same] == self._steps[same]:
            same += 1
        reusable = [r for r in self._reports if r.index < same]
        self._steps = steps
        self._reports = [r.model_copy(update={"reused": True}) for r in reusable]
        start = len(reusable)
        await asyncio.gather(*(self._prepare(chain, start) for chain in self._chains))
        started = time.perf_counter()
        usage = ModelUsage()
        for index in range(start, len(steps)):
            if scan == "first_error" and any(r.flagged for r in self._reports):
                break
            critiques = await all_or_nothing(
                [critic._critique_step(self.problem, steps, chain) for chain in self._chains]
            )
            for chain, critique in zip(self._chains, critiques, strict=True):
                chain.critiques.append(critique)
            reward = sum(c.reward for c in critiques) / len(critiques)
            verdicts = {v: sum(c.verdict == v for c in critiques) for v in ("yes", "no", "none")}
            step_report = StepReport(
                index=index,
                reward=reward,
                flagged=reward < cfg.threshold,
                verdicts=verdicts,
                chains=tuple(critiques),
            )
            # A first-error scan stops at a flagged step, and a rewrite starts at that step or
            # before it: the state after it is never a rewind's target.
            needed = not (scan == "first_error" and step_report.flagged)
            for chain in self._chains:
                self._snapshot(chain, needed=needed)
            self._reports.append(step_report)
            if on_step is not None:
                on_step(step_report)
            for critique in critiques:
                usage += critique.usage.model_copy(update={"seconds": 0.0})  # wall time is measured once
        usage = usage.model_copy(update={"seconds": time.perf_counter() - started})
        return CritiqueReport(
            problem=self.problem,
            steps=tuple(steps),
            scan=scan,
            samples=n,
            threshold=cfg.threshold,
            step_reports=tuple(self._reports),
            usage=usage,
        )

    async def _prepare(self, chain: _Chain, keep: int) -> None:
        """Make the chain's history and sandbox match the first ``keep`` steps."""
        sandbox = self.critic.sandbox
        if len(chain.critiques) > keep or (chain.session is None and chain.snapshots):
            await chain.rewind(keep, sandbox)
        if sandbox is None or self.critic.config.code_rounds == 0 or chain.has_sandbox:
            return
        if self.keep_snapshots and not chain.snapshots:
            chain.snapshots.append(None)  # the state after no step: a fresh session
        chain.opening = asyncio.create_task(sandbox.open_session())

    def _snapshot(self, chain: _Chain, *, needed: bool) -> None:
        if self.keep_snapshots and chain.has_sandbox:
            if needed:
                chain.snapshot()
            else:
                chain.snapshots.append(None)


def _word_ids(tokenizer: object, word: str) -> set[int]:
    """Token ids that spell ``word`` alone (with and without a leading space)."""
    ids: set[int] = set()
    for variant in (word, " " + word):
        with contextlib.suppress(Exception):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
    return ids
