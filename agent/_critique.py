"""One chain's critique of one step, written stage by stage as the GenPRM protocol reads.

The critique opens with the analysis (``<analyze>``). With code verification, verify rounds follow
(``<verify>``): the critic writes Python, the chain's sandbox session runs it, and its output is
fed back after ``[Code Output]``, until the critic writes its judgement (``<output>``). Without
code verification the judgement follows the analysis directly. When the limits are hit or no
judgement was written, the judgement is forced from the analysis alone.

A critique can also stop short of the full protocol (its *tier*, for the critic's cascade): a
direct judgement with no analysis, or an analysis and the judgement without code.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict

from critloop.agent.critic_protocol import (
    ANALYZE_PREFIX,
    ANALYZE_STOP,
    CODE_ERROR,
    CODE_FENCE_STOP,
    CODE_MISSING,
    CODE_OUTPUT,
    CODE_TIMEOUT,
    FORCED_JUDGEMENT,
    OUTPUT_PREFIX,
    OUTPUT_STOP,
    VERIFY_PREFIX,
    conversation,
)
from critloop.agent.verdict import RewardSource, Segment, Verdict, find_verdict, reward_for, segment_after
from critloop.errors import ModelError
from critloop.tools.completion import Completion, ModelUsage
from critloop.tools.tracing import traced_complete, traced_exec

if TYPE_CHECKING:
    from critloop.agent._chain import Chain
    from critloop.agent.budget import UsageMeter
    from critloop.agent.critic import GenPRMCritic
    from critloop.sandbox import ExecResult

__all__ = ["TIERS", "ChainCritique", "CodeRun", "CritiqueTier", "StepCritique", "shown_output"]

_CODE_BLOCK = re.compile(r"```python\s*(.*?)\s*```", re.DOTALL)

CritiqueTier = Literal["direct", "analysis", "code"]
"""How far a critique went before its judgement. ``direct``: the judgement at once, with no
analysis; ``analysis``: an analysis, then the judgement; ``code``: an analysis, code verification
in the sandbox, then the judgement (the full GenPRM protocol)."""
TIERS: tuple[CritiqueTier, ...] = get_args(CritiqueTier)
"""The tiers from the cheapest to the full protocol."""


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
    """Everything this chain spent on the step, lower tiers of the cascade included."""
    tier: CritiqueTier = "code"
    """How far the critique went (:data:`CritiqueTier`); ``code`` is the full protocol, the only
    tier without the cascade (``analysis`` when the critic has no sandbox)."""


class StepCritique:
    """One chain's critique of one step as it is written: the prompt, the critique so far, the
    generated segments (for the reward's logprobs), its running token count and its usage.

    :meth:`write` writes it up to a tier and returns the chain's :class:`ChainCritique`; called
    again with a higher tier, it goes on from what it wrote (the usage adds up). Underneath, the
    stages run in the protocol's order: :meth:`analyze`; then, if the analysis closed,
    :meth:`verify` when :attr:`verifies`, else :meth:`judge`; then :meth:`force_judgement`
    unless :attr:`judged`.

    Args:
        critic: the critic whose model, template and options write the critique.
        problem: the problem.
        steps: the solution's steps; the step critiqued is the first one the chain has not.
        chain: the chain: its earlier critiques (the conversation so far) and its sandbox.
    """

    def __init__(self, critic: GenPRMCritic, problem: str, steps: Sequence[str], chain: Chain) -> None:
        self._started = time.perf_counter()
        self._critic = critic
        self._config = critic.config
        self._chain = chain
        self._meter: UsageMeter | None = None
        self.paragraph = len(chain.critiques) + 1
        """The step's number in the protocol (1-based)."""
        self.subject = (problem, tuple(steps[: self.paragraph]))
        """The problem and the steps up to this one: what the critique is about."""
        self.prompt = critic.template.render(
            conversation(
                problem,
                steps,
                [c.text for c in chain.critiques],
                profile=self._config.profile,
                first_step_format=self._config.first_step_format,
            )
        )
        self.usage = ModelUsage()
        self.tier: CritiqueTier | None = None
        """The tier written so far; None before :meth:`write`."""
        self._restart()

    def _restart(self) -> None:
        """Forget the critique written so far (its usage stays counted)."""
        self.text = ""
        """The critique so far (the model continues ``prompt + text``)."""
        self.segments: list[Segment] = []
        self.tokens = 0
        """Tokens of the critique so far: a running sum of the model's own counts and ours of
        the text the protocol inserts, rather than re-tokenizing the growing text."""
        self.analysis = ""
        self.analysed: tuple[str, int, int] | None = None
        """The critique right after a closed analysis: its text, segment count and tokens."""
        self.code_runs: list[CodeRun] = []
        self.judged = False
        """The critique holds its judgement (no forced judgement needed)."""
        self.forced = False

    @property
    def verifies(self) -> bool:
        """Whether the critique verifies with code (code rounds allowed, and a sandbox)."""
        return self._config.code_rounds > 0 and self._chain.has_sandbox

    async def write(self, tier: CritiqueTier, *, meter: UsageMeter | None = None) -> ChainCritique:
        """Write the critique up to ``tier`` and return it.

        ``direct`` writes the judgement at once. ``analysis`` writes an analysis, then the
        judgement. ``code`` writes the full protocol; after an ``analysis`` tier it keeps that
        analysis and goes on with the code verification (a critique whose analysis did not
        close stays the forced judgement it was). Without :attr:`verifies`, ``code`` is
        ``analysis``.

        Args:
            tier: how far to go (:data:`CritiqueTier`).
            meter: checked before every model call and charged after it; None: no budget.
        """
        self._meter = meter
        if tier == "direct":
            self._restart()
            self.tier = "direct"
            # Not counted: no limit of the critique applies to a judgement alone.
            self.text = OUTPUT_PREFIX
            await self._generate(stop=(OUTPUT_STOP,), max_tokens=self._config.forced_judgement_tokens)
            self.judged = True
            return self.result()
        if self.tier == "analysis" and self.analysed is not None:
            self.text, segments, self.tokens = self.analysed
            del self.segments[segments:]
            self.judged = False
            closed = True
        elif self.tier == "analysis":
            return self.result()  # the analysis did not close: no tier can add to the forced judgement
        else:
            self._restart()
            closed = await self.analyze()
        self.tier = "analysis"
        if closed:
            if tier == "code" and self.verifies:
                self.tier = "code"
                await self.verify()
            else:
                await self.judge()
        if not self.judged:
            await self.force_judgement()
        return self.result()

    async def analyze(self) -> bool:
        """The ``<analyze>`` stage. Returns whether the analysis closed (if not, only a forced
        judgement can follow)."""
        self._insert(ANALYZE_PREFIX.format(k=self.paragraph))
        left = self._config.max_critique_tokens - self.tokens
        # The analysis ends before any judgement: its tokens' logprobs (often the longest
        # stretch, with top-k alternatives each) would be parsed only to be dropped.
        analysis = await self._generate(stop=(ANALYZE_STOP,), max_tokens=max(1, left), logprobs=False)
        self.analysis = analysis.text
        if analysis.stop != ANALYZE_STOP:
            return False
        self.analysed = (self.text, len(self.segments), self.tokens)
        return True

    async def verify(self) -> None:
        """The ``<verify>`` stage: up to ``code_rounds`` rounds, each generating until a Python
        fence closes (the code then runs in the chain's session, and its output is fed back
        after ``[Code Output]``) or the judgement closes."""
        self._insert(VERIFY_PREFIX)
        for _round in range(self._config.code_rounds):
            left = self._config.max_critique_tokens - self.tokens
            if left <= 0:
                return
            written = await self._generate(stop=(CODE_FENCE_STOP, OUTPUT_STOP), max_tokens=left)
            if written.stop == OUTPUT_STOP:
                self.judged = True
                return
            if written.stop != CODE_FENCE_STOP:
                # The model ended (end of sequence or length) without closing its judgement.
                self.judged = written.finish_reason == "stop" and find_verdict(self.text)[0] != "none"
                return
            run = await self._run_code()
            self.code_runs.append(run)
            self._insert(CODE_OUTPUT.format(output=run.output))

    async def judge(self) -> None:
        """The ``<output>`` stage straight after the analysis (no code verification)."""
        # Not counted: no limit of the critique applies past this point.
        self.text += OUTPUT_PREFIX
        await self._generate(stop=(OUTPUT_STOP,), max_tokens=self._config.forced_judgement_tokens)
        self.judged = True

    async def force_judgement(self) -> None:
        """The fallback when the limits were hit or no judgement was written: the analysis
        alone, then the judgement (as the reference implementation does)."""
        self.forced = True
        self.text = (
            ANALYZE_PREFIX.format(k=self.paragraph) + self.analysis.split("</analyze>")[0] + FORCED_JUDGEMENT
        )
        self.segments = []
        await self._generate(stop=(OUTPUT_STOP,), max_tokens=self._config.forced_judgement_tokens)

    def result(self) -> ChainCritique:
        """The critique as written, with its verdict and reward."""
        verdict, offset = find_verdict(self.text)
        cfg = self._config
        reward, source = reward_for(
            verdict,
            offset,
            self.segments,
            yes_ids=self._critic.yes_ids,
            no_ids=self._critic.no_ids,
            temperature=cfg.temperature if cfg.logprobs == "raw" else None,
        )
        return ChainCritique(
            text=self.text,
            verdict=verdict,
            reward=reward,
            reward_source=source,
            forced=self.forced,
            code_runs=tuple(self.code_runs),
            usage=self.usage.model_copy(update={"seconds": time.perf_counter() - self._started}),
            tier=self.tier or "code",
        )

    def _insert(self, piece: str) -> None:
        """Append text of the protocol (not the model's) to the critique, counting its tokens."""
        self.tokens += self._critic.template.count_tokens(piece)
        self.text += piece

    async def _generate(self, *, stop: tuple[str, ...], max_tokens: int, logprobs: bool = True) -> Completion:
        """One model call continuing the critique; what it wrote is appended to it."""
        cfg = self._config
        params = cfg.sampling(
            logprobs=cfg.top_logprobs if logprobs else None,
            include_stop=True,
            stop=stop,
            max_tokens=max_tokens,
        )
        if self._meter is not None:
            self._meter.before_call()
        try:
            result = await traced_complete(self._critic.model, self.prompt + self.text, params, role="critic")
        except ModelError as error:
            error.role = error.role or "critic"
            raise
        call = ModelUsage(
            calls=1, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
        )
        if self._meter is not None:
            self._meter.charge("critic", call)
        self.usage += call
        written = result.choices[0]
        self.tokens += written.completion_tokens or self._critic.template.count_tokens(written.text)
        self.segments.append(segment_after(self.text, written.text, written.tokens))
        self.text += written.text
        return written

    async def _run_code(self) -> CodeRun:
        """Run the critique's last code block in the chain's session."""
        blocks = _CODE_BLOCK.findall(self.text)
        if not blocks or not blocks[-1].strip():
            return CodeRun(code="", output=CODE_MISSING, status="missing")
        code = blocks[-1].strip()
        session = await self._chain.before_exec()
        result = await traced_exec(session, code, timeout=self._config.code_timeout_seconds)
        return CodeRun(
            code=code, output=shown_output(result, self._config.max_code_output_chars), status=result.status
        )


def shown_output(result: ExecResult, limit: int) -> str:
    """What a model is shown of a code run after ``[Code Output]``: its output, or the executor
    message GenPRM saw for code that failed or timed out, cut to ``limit`` characters (with a
    marker)."""
    output = result.stdout.strip()
    if result.status == "timeout":
        output = CODE_TIMEOUT
    elif result.status != "ok":
        error = CODE_ERROR.format(error=result.error or result.status)
        output = f"{output}\n{error}" if output else error
    if len(output) > limit:
        output = output[:limit] + f"\n... ({len(output) - limit} more characters not shown)"
    return output
