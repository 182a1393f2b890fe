"""What ``critloop solve`` shows while the loop runs (:class:`SolveView`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.status import Status
from rich.table import Table
from rich.text import Text

from critloop.graphs.events import RefinedEvent, RefiningEvent, SolutionEvent, StepEvent

if TYPE_CHECKING:
    from critloop.config import CritloopConfig
    from critloop.graphs.result import SolveResult
    from critloop.tools.endpoint import EndpointConfig

__all__ = ["SolveView"]

_VERDICT_STYLES = {"yes": "green", "no": "red", "none": "yellow"}
_STOP_REASONS = {
    "all_steps_pass": "every step passed the critic",
    "max_rounds": "the budget's refinement rounds were spent",
    "max_tokens": "the budget's generated tokens were spent",
    "max_seconds": "the budget's time ran out",
    "no_progress": "a refinement gave back nothing new",
    "error": "an infrastructure failure stopped the run",
}
_BAR_WIDTH = 20
_STEP_PREVIEW = 240


def _reward_bar(reward: float, verdict: str) -> Text:
    """A bar of ``_BAR_WIDTH`` cells for a reward in [0, 1], coloured by the majority verdict."""
    filled = max(0, min(_BAR_WIDTH, round(reward * _BAR_WIDTH)))
    style = _VERDICT_STYLES.get(verdict, "yellow")
    return Text.assemble(("█" * filled, style), ("░" * (_BAR_WIDTH - filled), "dim"))


def _labelled(label: str, body: Text, style: str, *, indent: int = 2) -> Table:
    """``label  body``, the body wrapping under itself."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=indent - 1 if indent > 1 else None)
    grid.add_column(style=style, no_wrap=True)
    grid.add_column()
    grid.add_row("", label, body)
    return grid


def _replicas(endpoint: EndpointConfig) -> str:
    n = len(endpoint.base_urls)
    return f" on {n} replicas ({endpoint.routing} routing)" if n > 1 else ""


_TIER_LABELS = {"direct": "judged directly", "analysis": "after analysis", "code": "after code"}


def _preview(text: str, limit: int = _STEP_PREVIEW) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class SolveView:
    """What `critloop solve` shows while the loop runs: each critiqued step with its reward,
    the flagged step and its rewrite per round, then the answer, the stop reason and the usage.

    ``out`` is None under ``--json``: only the status line (on stderr) moves then.
    """

    def __init__(self, out: Console | None, status: Status, *, max_rounds: int) -> None:
        self.out = out
        self.status = status
        self.max_rounds = max_rounds
        self.steps: list[str] = []
        """The solution being critiqued."""
        self.shown: set[int] = set()
        """Its steps shown with a reward."""
        self.flagged = False
        self.judged: dict[tuple[str, ...], tuple[float, str, bool]] = {}
        """(reward, verdict, flagged) of each step seen, by the steps up to it: the critic
        reuses the critiques of an unchanged prefix without an event."""
        self.last_solution: list[str] = []
        self.cascade = False
        """The critic cascades: each step shows the tier that decided it."""

    def header(self, problem: str, cfg: CritloopConfig, sandbox: str) -> None:
        if self.out is None:
            return
        critic = cfg.critic
        self.cascade = critic.cascade
        samples = cfg.budget.samples or critic.samples
        self.out.rule("[bold]critloop solve[/]")
        self.out.print(Text.assemble(("problem  ", "bold"), problem.strip()))
        self.out.print(
            Text(
                f"policy   {cfg.policy.kind} {cfg.policy.model}{_replicas(cfg.policy)}\n"
                f"critic   {critic.kind} {critic.model}{_replicas(critic)} ({critic.profile}, {samples} "
                f"sample{'s' if samples != 1 else ''}, threshold {critic.threshold}"
                f"{f', cascade with tau {critic.tau:g}' if critic.cascade else ''})\n"
                f"sandbox  {sandbox}\n"
                f"budget   {cfg.budget.max_rounds} rounds, {cfg.budget.max_tokens} tokens, "
                f"{cfg.budget.max_seconds:g} s; refine mode {cfg.refine.mode}",
                "dim",
            )
        )

    def handle(self, event: SolutionEvent | StepEvent | RefiningEvent | RefinedEvent) -> None:
        """Show one event of the run (every one but the last, :class:`DoneEvent`: see :meth:`result`)."""
        match event:
            case SolutionEvent():
                self._end_of_critique()
                self.steps, self.shown, self.flagged = list(event.steps), set(), False
                self.last_solution = self.steps
                n = len(self.steps)
                what = (
                    "initial solution"
                    if event.round == 0
                    else f"revised solution (round {event.round}/{self.max_rounds})"
                )
                self._rule(f"{what} · {n} step{'s' if n != 1 else ''}")
                self.status.update(f"critic: step 1 of {n}")
            case StepEvent():
                index = event.index
                for earlier in range(index):
                    if earlier not in self.shown:
                        self._reused(earlier)
                self._show(
                    index,
                    event.reward,
                    event.verdict,
                    event.flagged,
                    event.critique,
                    reused=event.reused,
                    tier=event.tier,
                )
                if event.flagged:
                    self.status.update(f"refiner: about to rewrite step {index + 1}")
                elif index + 1 < len(self.steps):
                    self.status.update(f"critic: step {index + 2} of {len(self.steps)}")
            case RefiningEvent():
                self._end_of_critique()
                self._rule(f"round {event.round}/{self.max_rounds} · refining step {event.index + 1}")
                self._print(_labelled("flagged", Text(_preview(event.step)), "bold red"))
                self.status.update(f"refiner: rewriting step {event.index + 1}")
            case RefinedEvent():
                self._print(_labelled("rewrite", Text(_preview(event.rewrite)), "bold green"))
                self.status.update("critic: judging the revised solution")

    def _show(
        self,
        index: int,
        reward: float,
        verdict: str,
        flagged: bool,
        critique: str | None,
        *,
        reused: bool = False,
        tier: str = "code",
    ) -> None:
        self.shown.add(index)
        self.flagged = self.flagged or flagged
        if 0 <= index < len(self.steps):
            self.judged[tuple(self.steps[: index + 1])] = (reward, verdict, flagged)
        style = _VERDICT_STYLES.get(verdict, "yellow")
        line = Text.assemble(
            (f"  step {index + 1:<3}", "bold"),
            _reward_bar(reward, verdict),
            (f" {reward:.2f} {verdict}", style),
        )
        if flagged:
            line.append("  flagged", "bold red")
        if self.cascade and not reused:
            line.append(f"  ({_TIER_LABELS.get(tier, tier)})", "dim")
        if reused:
            line.append("  (reused)", "dim")
        self._print(line)
        if 0 <= index < len(self.steps):
            step = Text(_preview(self.steps[index]), "" if flagged else "dim")
            self._print(Padding(step, (0, 0, 0, 10), expand=False))
        if flagged and critique:
            self._print(_labelled("critique", Text(_preview(critique), "italic"), "red", indent=10))

    def _reused(self, index: int) -> None:
        known = self.judged.get(tuple(self.steps[: index + 1]))
        if known is not None:
            self._show(index, *known, None, reused=True)
        else:
            self.shown.add(index)
            self._print(Text(f"  step {index + 1:<3}(reused)", "dim"))

    def _end_of_critique(self, report: dict[str, Any] | None = None) -> None:
        """Show the steps the critique of the current solution reused or left unjudged."""
        if not self.steps:
            return
        if report is not None and list(report.get("steps") or []) == self.steps:
            for step in report.get("step_reports") or []:
                index = step["index"]
                if index not in self.shown:
                    verdicts = step.get("verdicts") or {}
                    verdict = max(verdicts, key=verdicts.__getitem__) if verdicts else "none"
                    self._show(
                        index,
                        step["reward"],
                        verdict,
                        step["flagged"],
                        None,
                        reused=step.get("reused", False),
                    )
        if not self.shown:
            return
        first, last = max(self.shown) + 2, len(self.steps)
        if first <= last:
            which = f"step {first}" if first == last else f"steps {first}-{last}"
            why = " (the scan stops at the first flagged step)" if self.flagged else ""
            self._print(Text(f"  {which}: not critiqued{why}", "dim"))
        self.steps = []

    def result(self, result: SolveResult) -> None:
        self._end_of_critique(result.last_report)
        if self.out is None:
            return
        out = self.out
        if result.final_steps:
            earlier = result.final_steps != self.last_solution
            self._rule("final solution" + (" · the best one seen, from an earlier round" if earlier else ""))
            for i, step in enumerate(result.final_steps):
                reward = f"{result.step_rewards[i]:.2f}" if i < len(result.step_rewards) else "  - "
                out.print(_labelled(f"step {i + 1:<3}{reward}", Text(_preview(step)), "bold"))
        out.rule("[bold]result[/]")
        if result.answer is None:
            answer = Text("none (no \\boxed{} in the final solution)", "yellow")
        elif not result.answer.strip():
            answer = Text("none (an empty \\boxed{})", "yellow")
        else:
            answer = Text(result.answer, "bold green")
        out.print(Text.assemble(("answer: ", "bold"), answer))
        reason = result.stop_reason
        style = "green" if reason == "all_steps_pass" else "red" if reason == "error" else "yellow"
        out.print(
            Text.assemble(("stop reason: ", "bold"), (reason, style), f" — {_STOP_REASONS.get(reason, '')}")
        )
        if result.error:
            out.print(Text.assemble(("error: ", "bold red"), result.error))
        table = Table("role", "calls", "prompt tokens", "completion tokens", "seconds", title="usage")
        for role in ("policy", "critic", "refiner"):
            u = getattr(result.usage, role)
            table.add_row(
                role, str(u.calls), str(u.prompt_tokens), str(u.completion_tokens), f"{u.seconds:.1f}"
            )
        out.print(table)
        out.print(f"rounds: {len(result.rounds)}/{self.max_rounds} · time: {result.seconds:.1f} s")

    def _rule(self, title: str) -> None:
        if self.out is not None:
            self.out.rule(title, align="left")

    def _print(self, line: RenderableType) -> None:
        if self.out is not None:
            self.out.print(line)
