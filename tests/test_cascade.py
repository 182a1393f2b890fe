"""The critic's cascade on scripted models: direct judgement, then analysis, then code, per step."""

from __future__ import annotations

import math

import pytest
from critic_script import UNSURE, Plan, is_direct, judgement_reply, paragraph, scripted_genprm

from critloop.agent.budget import Budget, UsageMeter
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.critic_protocol import ANALYZE_PREFIX, OUTPUT_PREFIX, VERIFY_PREFIX
from critloop.agent.policy import critique_analysis
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams

PROBLEM = "What is 2 + 3 * 4?"
STEPS = ["First, 3 * 4 = 12.", "Then 2 + 12 = 15.", "The answer is \\boxed{15}."]
T = 0.6


def reward(lp_yes: float, lp_no: float) -> float:
    return 1.0 / (1.0 + math.exp((lp_no - lp_yes) / T))


YES = reward(-0.1, -2.4)
NO = reward(-1.8, -0.2)
UNSURE_YES = reward(UNSURE["Yes"]["Yes"], UNSURE["Yes"]["No"])


def cascade_critic(model, template, pool, **options) -> GenPRMCritic:  # type: ignore[no-untyped-def]
    return GenPRMCritic(model, template, pool, CriticConfig(profile="genprm", cascade=True, **options))


def tiers_of(model) -> list[str]:  # type: ignore[no-untyped-def]
    """What each call of a scripted critic asked for, in order."""
    kinds = []
    for prompt, _ in model.calls:
        if is_direct(prompt):
            kinds.append("direct")
        elif prompt.endswith(ANALYZE_PREFIX.format(k=paragraph(prompt))):
            kinds.append("analyze")
        elif prompt.endswith(OUTPUT_PREFIX):
            kinds.append("judge")
        else:
            kinds.append("verify")
    return kinds


async def test_confident_direct_judgements_decide_without_analysis_or_sandbox(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({})
    await local_pool.settle()
    opened = local_pool.status().sessions
    report = await cascade_critic(model, template, local_pool).critique(PROBLEM, STEPS)
    assert report.all_pass
    assert [s.tier for s in report.step_reports] == ["direct"] * 3
    assert tiers_of(model) == ["direct"] * 3
    chain = report.step_reports[0].chains[0]
    assert chain.text == OUTPUT_PREFIX + "{Yes}$\n</output>\n"
    assert (chain.tier, chain.verdict, chain.forced, chain.code_runs) == ("direct", "yes", False, ())
    assert math.isclose(chain.reward, YES) and chain.reward_source == "logprobs"
    assert local_pool.status().sessions == opened, "no step needed code: no session opened"
    # The direct critique is the assistant turn the next step's prompt carries.
    second_prompt = model.calls[1][0]
    assert second_prompt.count(OUTPUT_PREFIX + "{Yes}$\n</output>\n") == 1
    # A direct judgement has no analysis to show a refiner.
    assert critique_analysis(chain.text) == ""


async def test_an_unsure_direct_judgement_escalates_to_the_analysis(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(unsure=frozenset({"direct"}))})
    report = await cascade_critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    step = report.step_reports[0]
    assert step.tier == "analysis"
    assert tiers_of(model) == ["direct", "analyze", "judge"]
    chain = step.chains[0]
    assert chain.text.startswith(ANALYZE_PREFIX.format(k=1)) and "<verify>" not in chain.text
    assert chain.text.endswith("</analyze>\n" + OUTPUT_PREFIX + "{Yes}$\n</output>\n")
    assert math.isclose(chain.reward, YES)
    # The chain's usage covers both tiers; the report's adds up the chains'.
    assert chain.usage.calls == 3 and report.usage.calls == 3


async def test_unsure_after_the_analysis_the_code_tier_continues_that_analysis(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(verdict="No", unsure=frozenset({"direct", "analysis"}))})
    report = await cascade_critic(model, template, local_pool).critique(PROBLEM, STEPS)
    step = report.step_reports[0]
    assert step.tier == "code" and step.flagged and report.first_error == 0
    assert tiers_of(model) == ["direct", "analyze", "judge", "verify", "verify"]
    chain = step.chains[0]
    # The full protocol from the one analysis written: no second analysis, no stale judgement.
    assert chain.text.count("<analyze>") == 1 and chain.text.count("<output>") == 1
    assert chain.text.startswith(
        ANALYZE_PREFIX.format(k=1) + Plan().analysis + "\n</analyze>\n" + VERIFY_PREFIX
    )
    assert chain.code_runs[0].output == "5"
    assert math.isclose(chain.reward, NO) and chain.verdict == "no"
    assert chain.usage.calls == 5
    # The code tier's prompt is the analysis tier's critique cut back to its analysis.
    verify_prompt = model.calls[3][0]
    assert verify_prompt.endswith("</analyze>\n" + VERIFY_PREFIX)


async def test_the_last_tier_decides_even_when_unsure(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(unsure=frozenset({"direct", "analysis"}))})
    inner = model._script

    def respond(prompt: str, params: SamplingParams):  # type: ignore[no-untyped-def]
        reply = inner(prompt, params)  # type: ignore[operator]
        if isinstance(reply, str) and "**Judgement**" in reply:  # the code tier's judgement: unsure too
            return judgement_reply(reply[: reply.index("</output>\n") + len("</output>\n")], unsure=True)
        return reply

    model._script = respond
    report = await cascade_critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    step = report.step_reports[0]
    assert step.tier == "code" and math.isclose(step.reward, UNSURE_YES) and not step.flagged
    assert tiers_of(model) == ["direct", "analyze", "judge", "verify", "verify"]


async def test_without_a_sandbox_the_cascade_ends_at_the_analysis(template: ChatTemplate) -> None:
    model = scripted_genprm({1: Plan(unsure=frozenset({"direct", "analysis"}))})
    critic = cascade_critic(model, template, None)
    assert critic.tiers == ("direct", "analysis")
    report = await critic.critique(PROBLEM, STEPS[:1])
    step = report.step_reports[0]
    assert step.tier == "analysis" and math.isclose(step.reward, UNSURE_YES)
    assert tiers_of(model) == ["direct", "analyze", "judge"]


def test_the_tiers_follow_the_config(template: ChatTemplate, local_pool: SandboxPool) -> None:
    model = scripted_genprm({})
    plain = GenPRMCritic(model, template, local_pool, CriticConfig(profile="genprm"))
    assert plain.tiers == ("code",)
    assert GenPRMCritic(model, template, None, CriticConfig(profile="genprm")).tiers == ("analysis",)
    assert cascade_critic(model, template, local_pool).tiers == ("direct", "analysis", "code")
    assert cascade_critic(model, template, local_pool, code_rounds=0).tiers == ("direct", "analysis")


@pytest.mark.parametrize("tau", [0.0, -0.1, 0.6])
def test_tau_out_of_range_is_refused(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        CriticConfig(cascade=True, tau=tau)


async def test_maj_at_n_decides_on_the_mean_reward(template: ChatTemplate, local_pool: SandboxPool) -> None:
    # Two chains, each sure at a glance but of opposite verdicts: the mean (about 0.52) is unsure,
    # so both go on to the analysis, where they agree.
    model = scripted_genprm({})
    inner = model._script
    direct_verdicts = iter(["Yes", "No"])

    def respond(prompt: str, params: SamplingParams):  # type: ignore[no-untyped-def]
        if is_direct(prompt):
            return "{" + next(direct_verdicts) + "}$\n</output>\n"
        return inner(prompt, params)  # type: ignore[operator]

    model._script = respond
    report = await cascade_critic(model, template, local_pool, samples=2).critique(PROBLEM, STEPS[:1])
    step = report.step_reports[0]
    assert step.tier == "analysis" and [c.tier for c in step.chains] == ["analysis", "analysis"]
    assert step.verdicts == {"yes": 2, "no": 0, "none": 0}
    calls = tiers_of(model)
    assert calls[:2] == ["direct", "direct"], "both direct judgements come before any analysis"
    assert sorted(calls[2:]) == ["analyze", "analyze", "judge", "judge"]


async def test_a_wider_tau_accepts_what_the_default_escalates(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(unsure=frozenset({"direct"}))})
    report = await cascade_critic(model, template, local_pool, tau=0.45).critique(PROBLEM, STEPS[:1])
    assert report.step_reports[0].tier == "direct"
    assert math.isclose(report.step_reports[0].reward, UNSURE_YES)


async def test_recritique_with_the_cascade_keeps_the_sandbox_state_of_earlier_code(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    hard = frozenset({"direct", "analysis"})
    model = scripted_genprm(
        {
            1: Plan(unsure=hard, code=["a = 5\nprint(a)"]),
            3: Plan(verdict="No", unsure=hard, code=["print(a * 2)"]),
        }
    )
    critic = cascade_critic(model, template, local_pool, samples=2)
    async with critic.run(PROBLEM) as run:
        first = await run.critique(STEPS)
        assert [s.tier for s in first.step_reports] == ["code", "direct", "code"]
        assert first.first_error == 2
        assert [c.code_runs[0].output for c in first.step_reports[2].chains] == ["10", "10"]
        calls_before = len(model.calls)
        model._script = scripted_genprm({3: Plan(unsure=hard, code=["print(a + 1)"])})._script
        second = await run.critique([*STEPS[:2], "The answer is \\boxed{14}."])
    assert [r.reused for r in second.step_reports] == [True, True, False]
    assert {paragraph(p) for p, _ in model.calls[calls_before:]} == {3}
    # Step 3's code went on from the state after step 1's code (a = 5), across the direct step 2.
    assert [c.code_runs[0].output for c in second.step_reports[2].chains] == ["6", "6"]
    assert second.all_pass and second.step_reports[2].tier == "code"


async def test_a_session_opened_late_lines_up_with_the_steps_for_a_rewind(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    # Steps 1 and 2 need no code; step 3 opens the session. Rewriting step 3 rewinds to the
    # state after step 2, a fresh session's: the code of the first step-3 critique is gone.
    hard = frozenset({"direct", "analysis"})
    model = scripted_genprm({3: Plan(verdict="No", unsure=hard, code=["leftover = 1\nprint(leftover)"])})
    async with cascade_critic(model, template, local_pool).run(PROBLEM) as run:
        first = await run.critique(STEPS)
        assert [s.tier for s in first.step_reports] == ["direct", "direct", "code"]
        model._script = scripted_genprm(
            {3: Plan(unsure=hard, code=["print('leftover' in globals())"])}
        )._script
        second = await run.critique([*STEPS[:2], "The answer is \\boxed{14}."])
    assert second.step_reports[2].chains[0].code_runs[0].output == "False"


async def test_the_meter_is_charged_every_tier(template: ChatTemplate, local_pool: SandboxPool) -> None:
    hard = frozenset({"direct", "analysis"})
    model = scripted_genprm({1: Plan(unsure=hard), 2: Plan(unsure=frozenset({"direct"}))})
    meter = UsageMeter(Budget())
    report = await cascade_critic(model, template, local_pool, samples=2).critique(
        PROBLEM, STEPS, scan="all", meter=meter
    )
    assert [s.tier for s in report.step_reports] == ["code", "analysis", "direct"]
    assert [s.chains[0].usage.calls for s in report.step_reports] == [5, 3, 1]
    charged = meter.usage.critic
    assert charged.calls == len(model.calls) == report.usage.calls == 2 * (5 + 3 + 1)
    assert charged.completion_tokens == report.usage.completion_tokens
