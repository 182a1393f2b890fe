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
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from critloop.agent._chain import Chain
from critloop.agent._critique import TIERS, ChainCritique, CodeRun, CritiqueTier, StepCritique
from critloop.agent.budget import UsageMeter
from critloop.agent.critic_protocol import DEFAULT_FIRST_STEP_FORMAT, CriticProfile
from critloop.errors import ConfigError
from critloop.sandbox import SandboxPool
from critloop.tools import tracing
from critloop.tools._concurrency import all_or_nothing
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionModel, LogprobsMode, ModelUsage
from critloop.tools.endpoint import EndpointConfig

__all__ = [
    "ChainCritique",
    "CodeRun",
    "CriticConfig",
    "CritiqueReport",
    "CritiqueRun",
    "CritiqueTier",
    "GenPRMCritic",
    "ScanMode",
    "StepReport",
]

ScanMode = Literal["first_error", "all"]
"""``first_error``: critique steps in order and stop at the first flagged one (the refine loop,
ProcessBench). ``all``: score every step (Best-of-N ranking, full reports)."""


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
    logprobs: LogprobsMode = "raw"
    """What the server's logprobs are. ``raw`` (vLLM's default, llama.cpp's, the embedded
    engine's): the reward rescales them by the sampling temperature, 1 / (1 + exp((lp_No - lp_Yes)
    / T)), which is P(Yes) / (P(Yes) + P(No)) after temperature as GenPRM computed it.
    ``processed`` (vLLM with ``--logprobs-mode processed_logprobs``): the plain ratio."""
    top_logprobs: int = Field(default=20, ge=1, le=20)
    """Top-k logprobs asked for at the stages that can hold the judgement (the reward needs the
    other answer's); the analysis stage asks for none."""
    first_step_format: str = DEFAULT_FIRST_STEP_FORMAT
    code_timeout_seconds: float = Field(default=5.0, gt=0)
    max_code_output_chars: int = Field(default=2000, ge=100)
    """Code output shown to the critic is cut to this (with a marker)."""
    cascade: bool = False
    """Critique each step in tiers, the cheapest first (the authors' adaptive evaluation): a
    direct judgement; if the step's mean reward is not within ``tau`` of 0 or 1, an analysis and
    the judgement; if still not, code verification continuing that analysis. The step's report
    names the tier that decided (:data:`CritiqueTier`)."""
    tau: float = Field(default=0.1, gt=0, le=0.5)
    """The cascade stops at a tier whose mean reward is below ``tau`` or above ``1 - tau``."""

    @model_validator(mode="before")
    @classmethod
    def _logprobs_is_a_mode(cls, data: object) -> object:
        # ``logprobs`` was the number of top logprobs before it named the server's mode.
        if isinstance(data, dict) and isinstance(data.get("logprobs"), int):
            raise ValueError(
                f"logprobs = {data['logprobs']}: logprobs names what the server's logprobs are "
                '("raw" or "processed"); the number of alternatives is top_logprobs'
            )
        return data

    @model_validator(mode="after")
    def _instruct_for_the_embedded_model(self) -> CriticConfig:
        # The embedded SmolLM2 is no GenPRM checkpoint: unless told otherwise, teach it the format.
        if self.kind == "embedded" and "profile" not in self.model_fields_set:
            object.__setattr__(self, "profile", "instruct")
        return self


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
    tier: CritiqueTier = "code"
    """The tier that decided the step: the furthest any chain's critique went (without the
    cascade, the full protocol: ``code``, or ``analysis`` with no sandbox)."""


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
        self.yes_ids = frozenset(_word_ids(tokenizer, "Yes"))
        """Token ids of the decision word ``Yes`` (with and without a leading space)."""
        self.no_ids = frozenset(_word_ids(tokenizer, "No"))
        """Token ids of the decision word ``No``."""

    @property
    def tiers(self) -> tuple[CritiqueTier, ...]:
        """The tiers a step's critique goes through until one decides: the full protocol alone
        or, with the cascade, ``direct``, ``analysis`` and (with code verification) ``code``."""
        top: CritiqueTier = "code" if self.config.code_rounds > 0 and self.sandbox is not None else "analysis"
        return TIERS[: TIERS.index(top) + 1] if self.config.cascade else (top,)

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
        meter: UsageMeter | None = None,
    ) -> CritiqueReport:
        """Critique a solution once (no reuse across calls).

        Args:
            problem: the problem.
            steps: the solution's steps.
            scan: ``first_error`` stops at the first flagged step; ``all`` scores every step.
            samples: Maj@N chains (default: the config's ``samples``).
            meter: the run's budget, checked before every model call and charged after it;
                :class:`~critloop.errors.BudgetExceededError` propagates once it is spent.
        """
        run = self.run(problem, keep_snapshots=False)
        try:
            report = await run.critique(steps, scan=scan, samples=samples, meter=meter)
        except BaseException:
            run.release()
            raise
        await run.finish()
        return report

    async def critique_step(
        self,
        problem: str,
        steps: Sequence[str],
        chain: Chain,
        *,
        tier: CritiqueTier = "code",
        meter: UsageMeter | None = None,
    ) -> ChainCritique:
        """One chain's critique of the next step: the first of ``steps`` that ``chain`` has not
        critiqued. The stages follow the GenPRM protocol.

        Args:
            problem: the problem.
            steps: the solution's steps.
            chain: the chain: its earlier critiques, its sandbox session, and its draft of this
                step from a lower tier, which a higher ``tier`` continues.
            tier: how far the critique goes (:data:`CritiqueTier`); the full protocol by default.
            meter: checked before every model call and charged after it; None: no budget.
        """
        draft = chain.draft
        if (
            draft is None
            or draft.tier is None
            or TIERS.index(draft.tier) >= TIERS.index(tier)
            or draft.subject != (problem, tuple(steps[: len(chain.critiques) + 1]))
        ):
            draft = chain.draft = StepCritique(self, problem, steps, chain)
        return await draft.write(tier, meter=meter)


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
        self._chains: list[Chain] = []
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

    async def finish(self) -> None:
        """Release the run once it is done, leaving no session counted as open: a session still
        opening (each opens in the background while the first analysis is written, and is
        awaited only when code first runs) is taken first, at most a kernel round trip; the
        kills then go on in the background (:meth:`release`). For a run abandoned or failed,
        where nothing may be awaited, call :meth:`release`."""
        await asyncio.gather(
            *(chain.ready() for chain in self._chains if chain.opening is not None), return_exceptions=True
        )
        self.release()

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
        self._chains = [Chain() for _ in range(report.samples)]
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
        meter: UsageMeter | None = None,
    ) -> CritiqueReport:
        """Critique ``steps`` (reusing what is unchanged since the last call).

        Args:
            steps: the solution's steps.
            scan: ``first_error`` stops at the first flagged step; ``all`` scores every step.
            samples: Maj@N chains (default: the config's ``samples``).
            on_step: called with each step's report: first those of the unchanged prefix
                (``reused``), then each newly critiqued one as soon as it is ready.
            meter: the run's budget, checked before every model call and charged after it.
                Once it is spent, :class:`~critloop.errors.BudgetExceededError` propagates (the
                chains' other calls are cancelled); each chain may have overshot it by the one
                call it had in flight.
        """
        if self._closed:
            raise ConfigError("this critique run is closed")
        steps = list(steps)
        if not steps:
            raise ValueError("a solution needs at least one step to critique")
        cfg = self.critic.config
        n = samples or cfg.samples
        if len(self._chains) != n:
            await self.aclose()
            self._closed = False
            self._chains = [Chain() for _ in range(n)]
            self._steps, self._reports = [], []
        same = 0
        while same < min(len(steps), len(self._steps)) and steps[same] == self._steps[same]:
            same += 1
        reusable = [r for r in self._reports if r.index < same]
        self._steps = steps
        self._reports = [r.model_copy(update={"reused": True}) for r in reusable]
        start = len(reusable)
        if on_step is not None:
            for report in self._reports:
                on_step(report)
        await asyncio.gather(*(self._prepare(chain, start) for chain in self._chains))
        started = time.perf_counter()
        usage = ModelUsage()
        for index in range(start, len(steps)):
            if scan == "first_error" and any(r.flagged for r in self._reports):
                break
            with tracing.span("critic.step", "EVALUATOR", _step_attributes(index, steps[index])) as current:
                critiques = await self._critique_step(steps, meter)
                reward = sum(c.reward for c in critiques) / len(critiques)
                verdicts = {v: sum(c.verdict == v for c in critiques) for v in ("yes", "no", "none")}
                step_report = StepReport(
                    index=index,
                    reward=reward,
                    flagged=reward < cfg.threshold,
                    verdicts=verdicts,
                    chains=tuple(critiques),
                    tier=max((c.tier for c in critiques), key=TIERS.index),
                )
                tracing.record(current, _report_attributes(step_report))
            for chain, critique in zip(self._chains, critiques, strict=True):
                chain.critiques.append(critique)
                chain.draft = None
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

    async def _critique_step(self, steps: Sequence[str], meter: UsageMeter | None) -> list[ChainCritique]:
        """Every chain's critique of the next step: at the critic's first tier whose mean reward
        is within ``tau`` of 0 or 1, else at its last (the full protocol)."""
        critic, tau = self.critic, self.critic.config.tau
        tiers = critic.tiers
        for tier in tiers:
            if tier == "code":
                for chain in self._chains:
                    if not chain.has_sandbox:
                        self._open(chain)
            critiques = await all_or_nothing(
                [
                    critic.critique_step(self.problem, steps, chain, tier=tier, meter=meter)
                    for chain in self._chains
                ]
            )
            reward = sum(c.reward for c in critiques) / len(critiques)
            if min(reward, 1.0 - reward) < tau:
                break
        return critiques

    async def _prepare(self, chain: Chain, keep: int) -> None:
        """Make the chain's history and sandbox match the first ``keep`` steps. With the cascade,
        a chain's session opens only when a step first needs code (:meth:`_critique_step`)."""
        sandbox, cfg = self.critic.sandbox, self.critic.config
        if len(chain.critiques) > keep or (chain.session is None and chain.snapshots):
            await chain.rewind(keep, None if cfg.cascade else sandbox)
        if cfg.cascade or sandbox is None or cfg.code_rounds == 0 or chain.has_sandbox:
            return
        self._open(chain)

    def _open(self, chain: Chain) -> None:
        """Start opening the chain's working session, fresh."""
        assert self.critic.sandbox is not None
        if self.keep_snapshots:
            # The state after each step so far is a fresh session's: this chain has run no code
            # since (or ever); None stands for it (a rewind opens a fresh session).
            chain.snapshots.extend([None] * (len(chain.critiques) + 1 - len(chain.snapshots)))
        chain.open(self.critic.sandbox)

    def _snapshot(self, chain: Chain, *, needed: bool) -> None:
        if self.keep_snapshots and chain.has_sandbox:
            if needed:
                chain.snapshot()
            else:
                chain.snapshots.append(None)


def _step_attributes(index: int, step: str) -> dict[str, Any]:
    return {"critloop.step.index": index, "input.value": step}


def _report_attributes(report: StepReport) -> dict[str, Any]:
    """What a step's span shows of its report: the reward, the verdicts, the tier, the first
    chain's critique."""
    return {
        "output.value": report.chains[0].text if report.chains else "",
        "critloop.step.reward": report.reward,
        "critloop.step.flagged": report.flagged,
        "critloop.step.tier": report.tier,
        **{f"critloop.step.verdicts.{verdict}": n for verdict, n in report.verdicts.items()},
    }


def _word_ids(tokenizer: object, word: str) -> set[int]:
    """Token ids that spell ``word`` alone (with and without a leading space)."""
    ids: set[int] = set()
    for variant in (word, " " + word):
        with contextlib.suppress(Exception):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
    return ids
