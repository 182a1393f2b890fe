"""The GenPRM critic on scripted models: every branch of the protocol, Maj@N, reuse, robustness."""

from __future__ import annotations

import asyncio
import math

import pytest
from critic_script import DECISIONS, Plan, paragraph, scripted_genprm

from critloop.agent.budget import Budget, UsageMeter
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.critic_protocol import (
    ANALYZE_PREFIX,
    ANALYZE_STOP,
    FORCED_JUDGEMENT,
    OUTPUT_STOP,
    VERIFY_PREFIX,
)
from critloop.agent.verdict import Segment, reward_for, segment_after
from critloop.errors import BudgetExceededError, ModelEndpointError
from critloop.sandbox import SandboxPool, Session
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, ModelUsage, SamplingParams, TokenLogprob, TopLogprob
from critloop.tools.fakes import ScriptedCompletionModel, scripted_tokens

PROBLEM = "What is 2 + 3 * 4?"
STEPS = ["First, 3 * 4 = 12.", "Then 2 + 12 = 15.", "The answer is \\boxed{15}."]
T = 0.6  # the critic's default temperature; its default logprobs are raw


def after_temperature(lp_yes: float, lp_no: float, t: float = T) -> float:
    """P(Yes) / (P(Yes) + P(No)) of the distribution at temperature t, from raw logprobs."""
    p_yes, p_no = math.exp(lp_yes / t), math.exp(lp_no / t)
    return p_yes / (p_yes + p_no)


YES = after_temperature(-0.1, -2.4)  # the scripted model's Yes token: {"Yes": -0.1, "No": -2.4}
NO = after_temperature(-1.8, -0.2)


def critic(model, template, pool, **options) -> GenPRMCritic:  # type: ignore[no-untyped-def]
    return GenPRMCritic(model, template, pool, CriticConfig(**{"profile": "genprm", **options}))


async def test_a_clean_solution_passes_with_logprob_rewards(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS)
    assert report.all_pass and report.first_error is None
    assert [round(r, 6) for r in report.rewards] == [round(YES, 6)] * 3
    chain = report.step_reports[0].chains[0]
    assert (chain.verdict, chain.reward_source, chain.forced) == ("yes", "logprobs", False)
    assert chain.code_runs[0].code == "print(2 + 3)" and chain.code_runs[0].output == "5"
    assert chain.text.startswith(ANALYZE_PREFIX.format(k=1))
    assert "[Code Output]\n\n```\n5\n```\n" in chain.text
    assert chain.text.endswith("$\\boxed{Yes}$\n</output>\n")
    assert chain.usage.calls == 3 and report.usage.calls == 9
    assert report.usage.completion_tokens == sum(
        c.usage.completion_tokens for s in report.step_reports for c in s.chains
    )
    assert report.step_reports[0].verdicts == {"yes": 1, "no": 0, "none": 0}


async def test_first_error_scan_stops_at_the_flagged_step(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({2: Plan(verdict="No")})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS)
    assert report.first_error == 1
    assert [s.index for s in report.step_reports] == [0, 1]
    assert math.isclose(report.step_reports[1].reward, NO)
    assert report.step_reports[1].flagged and not report.all_pass
    assert {paragraph(p) for p, _ in model.calls} == {1, 2}


async def test_scan_all_scores_every_step(template: ChatTemplate, local_pool: SandboxPool) -> None:
    model = scripted_genprm({2: Plan(verdict="No")})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS, scan="all")
    assert [s.flagged for s in report.step_reports] == [False, True, False]


async def test_golden_prompts_under_the_embedded_template(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS)
    c1, c2 = (s.chains[0].text for s in report.step_reports[:2])
    analyze_prompts = [p for p, _ in model.calls if p.endswith("step by step: ")]
    system = (
        "<|im_start|>system\nYou are a math teacher. Your task is to review and critique the paragraphs "
        "in solution step by step.<|im_end|>\n"
    )
    assert analyze_prompts == [
        system + f"<|im_start|>user\n{PROBLEM}\n{STEPS[0]}" + ANALYZE_PREFIX.format(k=1),
        system
        + f"<|im_start|>user\n{PROBLEM}\n{STEPS[0]}<|im_end|>\n"
        + f"<|im_start|>assistant\n{c1}<|im_end|>\n"
        + f"<|im_start|>user\n{STEPS[1]}"
        + ANALYZE_PREFIX.format(k=2),
        system
        + f"<|im_start|>user\n{PROBLEM}\n{STEPS[0]}<|im_end|>\n"
        + f"<|im_start|>assistant\n{c1}<|im_end|>\n"
        + f"<|im_start|>user\n{STEPS[1]}<|im_end|>\n"
        + f"<|im_start|>assistant\n{c2}<|im_end|>\n"
        + f"<|im_start|>user\n{STEPS[2]}"
        + ANALYZE_PREFIX.format(k=3),
    ]


DEEPSEEK_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


async def test_golden_prompts_under_a_deepseek_r1_distill_style_template(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    import copy

    tokenizer = copy.deepcopy(template.tokenizer)
    tokenizer.chat_template = DEEPSEEK_STYLE
    tokenizer.bos_token = "<｜begin▁of▁sentence｜>"
    tokenizer.eos_token = "<｜end▁of▁sentence｜>"
    model = scripted_genprm({})
    report = await critic(model, ChatTemplate(tokenizer), local_pool).critique(PROBLEM, STEPS, scan="all")
    c1, c2 = (s.chains[0].text for s in report.step_reports[:2])
    head = (
        "<｜begin▁of▁sentence｜>You are a math teacher. Your task is to review and critique the paragraphs "
        "in solution step by step."
    )
    analyze_prompts = [p for p, _ in model.calls if p.endswith("step by step: ")]
    assert analyze_prompts == [
        head + f"<｜User｜>{PROBLEM}\n{STEPS[0]}" + ANALYZE_PREFIX.format(k=1),
        head
        + f"<｜User｜>{PROBLEM}\n{STEPS[0]}<｜Assistant｜>{c1}<｜end▁of▁sentence｜><｜User｜>{STEPS[1]}"
        + ANALYZE_PREFIX.format(k=2),
        head
        + f"<｜User｜>{PROBLEM}\n{STEPS[0]}<｜Assistant｜>{c1}<｜end▁of▁sentence｜><｜User｜>{STEPS[1]}"
        + f"<｜Assistant｜>{c2}<｜end▁of▁sentence｜><｜User｜>{STEPS[2]}"
        + ANALYZE_PREFIX.format(k=3),
    ]


def test_the_instruct_profile_teaches_the_format_with_a_worked_example() -> None:
    from critloop.agent.critic_protocol import INSTRUCT_SYSTEM_PROMPT, SYSTEM_PROMPT, conversation

    messages = conversation(PROBLEM, STEPS, [], profile="instruct")
    assert messages[0]["content"] == INSTRUCT_SYSTEM_PROMPT
    assert INSTRUCT_SYSTEM_PROMPT.startswith(SYSTEM_PROMPT)
    for part in ("<analyze>", "</verify>", "[Code Output]", "$\\boxed{No}$", "</output>"):
        assert part in INSTRUCT_SYSTEM_PROMPT
    assert messages[1:] == [{"role": "user", "content": f"{PROBLEM}\n{STEPS[0]}"}]


def test_the_embedded_critic_defaults_to_the_instruct_profile() -> None:
    assert CriticConfig().profile == "instruct"
    assert CriticConfig(kind="embedded", profile="genprm").profile == "genprm"
    assert CriticConfig(kind="openai", base_url="http://x/v1", model="GenPRM/GenPRM-7B").profile == "genprm"


async def test_stage_requests_follow_the_protocol(template: ChatTemplate, local_pool: SandboxPool) -> None:
    model = scripted_genprm({})
    await critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    (_p1, s1), (p2, s2), (p3, s3) = model.calls
    # Logprobs only where the judgement can be: not for the analysis.
    assert s1.stop == ("</analyze>\n",) and s1.include_stop and s1.logprobs is None
    assert (s1.temperature, s1.top_p, s1.top_k, s1.repetition_penalty) == (0.6, 0.95, 20, 1.0)
    assert p2.endswith("</analyze>\n" + VERIFY_PREFIX)
    assert s2.stop == ("\n```\n", "</output>\n") and s2.include_stop and s2.logprobs == 20
    assert s3.logprobs == 20
    assert p3.endswith("print(2 + 3)\n```\n[Code Output]\n\n```\n5\n```\n")


async def test_multi_round_code_keeps_state_within_the_critique(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(code=["a = 6 * 7", "print(a)"])})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    runs = report.step_reports[0].chains[0].code_runs
    assert [(r.code, r.output, r.status) for r in runs] == [("a = 6 * 7", "", "ok"), ("print(a)", "42", "ok")]


async def test_code_errors_and_timeouts_use_the_training_messages(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(code=["1 / 0", "while True: pass"])})
    report = await critic(model, template, local_pool, code_timeout_seconds=0.3).critique(PROBLEM, STEPS[:1])
    runs = report.step_reports[0].chains[0].code_runs
    assert runs[0].output == "Code execute Error: ZeroDivisionError: division by zero"
    assert runs[1].output == "Code execute time out: Code execution timed out"
    assert runs[1].status == "timeout"


async def test_rounds_exhausted_forces_the_judgement_from_the_analysis(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(code=["print(1)"] * 5, verdict="No")})
    report = await critic(model, template, local_pool, code_rounds=3).critique(PROBLEM, STEPS[:1])
    chain = report.step_reports[0].chains[0]
    assert chain.forced and chain.verdict == "no"
    assert chain.text == (
        ANALYZE_PREFIX.format(k=1)
        + "The arithmetic in this paragraph checks out.\n"
        + FORCED_JUDGEMENT
        + "{No}$\n</output>\n"
    )
    assert math.isclose(chain.reward, NO)
    assert model.calls[-1][1].max_tokens == 20 and model.calls[-1][0].endswith(FORCED_JUDGEMENT)
    assert len(model.calls) == 1 + 3 + 1


async def test_the_token_limit_forces_the_judgement(template: ChatTemplate, local_pool: SandboxPool) -> None:
    long_code = "x = 1\n" * 200
    # A backend counts its completions in its own tokenizer's tokens: this one in the template's.
    model = scripted_genprm({1: Plan(code=[long_code, long_code])}, count_tokens=template.count_tokens)
    report = await critic(model, template, local_pool, max_critique_tokens=300).critique(PROBLEM, STEPS[:1])
    chain = report.step_reports[0].chains[0]
    assert chain.forced
    assert model.calls[1][1].max_tokens < 300
    # The running count agrees with tokenizing the critique so far (up to merges at the seams).
    base = model.calls[0][0][: -len(ANALYZE_PREFIX.format(k=1))]
    for prompt, params in model.calls[1:2]:
        so_far = len(template.tokenizer(prompt[len(base) :], add_special_tokens=False)["input_ids"])
        assert params.max_tokens is not None and abs((300 - so_far) - params.max_tokens) <= 3


async def test_a_session_no_code_used_is_closed_when_the_critique_returns(
    template: ChatTemplate, local_pool: SandboxPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session opens in the background while the analysis is written; here the token limit
    # ends the critique before any code runs, and the open is still under way when it does.
    opened: list[Session] = []
    open_session = local_pool.open_session

    async def recording_open() -> Session:
        session = await open_session()
        opened.append(session)
        return session

    monkeypatch.setattr(local_pool, "open_session", recording_open)
    model = scripted_genprm({1: Plan(code=["x = 1\n" * 200])}, count_tokens=template.count_tokens)
    report = await critic(model, template, local_pool, max_critique_tokens=300).critique(PROBLEM, STEPS[:1])
    assert report.step_reports[0].chains[0].code_runs == ()
    assert len(opened) == 1 and opened[0].closed
    assert local_pool.status().sessions == 0
    await local_pool.settle()


class OverlappingModel:
    """A scripted model whose calls overlap as a server's do: each answers only after the event
    loop has turned, so the chains of a step all make their call before any of them is charged."""

    def __init__(self, inner: ScriptedCompletionModel) -> None:
        self.inner = inner
        self.name = inner.name

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        await asyncio.sleep(0)
        return await self.inner.complete(prompt, params)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_spent_budget_stops_the_critique_one_call_per_chain_past_it(template: ChatTemplate) -> None:
    analysis = len(scripted_tokens(f"{Plan().analysis}\n{ANALYZE_STOP}"))
    judgement = len(scripted_tokens("{Yes}$\n" + OUTPUT_STOP))
    model = scripted_genprm({})
    # Enough for the four analyses of step 1, not for their judgements as well.
    meter = UsageMeter(Budget(max_tokens=4 * analysis + 1))
    with pytest.raises(BudgetExceededError, match="token budget is spent"):
        await critic(OverlappingModel(model), template, None, samples=4).critique(PROBLEM, STEPS, meter=meter)
    # The four judgements were under way when the limit was reached (one call per chain past
    # it); the first chain to critique step 2 found the budget spent, and the others were cancelled.
    assert {paragraph(p) for p, _ in model.calls} == {1}
    charged = meter.usage.critic
    assert charged.calls == len(model.calls) == 8
    assert charged.completion_tokens == 4 * (analysis + judgement)
    assert charged.completion_tokens - meter.budget.max_tokens == 4 * judgement - 1


async def test_the_meter_is_charged_what_the_report_counts(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    # Every stage's calls: analyses, verify rounds, judgements, and a forced judgement (step 2).
    model = scripted_genprm({2: Plan(code=["print(1)"] * 5)})
    meter = UsageMeter(Budget())
    report = await critic(model, template, local_pool, samples=2).critique(
        PROBLEM, STEPS, scan="all", meter=meter
    )
    assert [c.forced for c in report.step_reports[1].chains] == [True, True]
    charged = meter.usage.critic
    assert charged.calls == len(model.calls)
    assert (charged.calls, charged.prompt_tokens, charged.completion_tokens) == (
        report.usage.calls,
        report.usage.prompt_tokens,
        report.usage.completion_tokens,
    )
    assert meter.usage.policy == meter.usage.refiner == ModelUsage()


async def test_without_logprobs_the_reward_is_a_hard_label(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({2: Plan(verdict="No")}, with_logprobs=False)
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS)
    assert report.rewards == [1.0, 0.0]
    assert {c.reward_source for s in report.step_reports for c in s.chains} == {"hard_label"}


async def test_the_missing_alternative_takes_the_smallest_top_logprob(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({})
    model.alternatives = {"Yes": {"Yes": -0.5, "Maybe": -1.0, "Perhaps": -3.0}}
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    assert math.isclose(report.rewards[0], after_temperature(-0.5, -3.0))
    assert report.step_reports[0].chains[0].reward_source == "logprobs_bound"


def _decision(lp_yes: float, lp_no: float, verdict: str = "Yes") -> list[Segment]:
    """The segments of a critique ending in \\boxed{<verdict>}, the verdict token with both answers
    among its top logprobs."""
    top = (TopLogprob(token="Yes", logprob=lp_yes), TopLogprob(token="No", logprob=lp_no))
    chosen = lp_yes if verdict == "Yes" else lp_no
    head = "**Judgement**: $\\boxed{"
    return [
        Segment(0, head, ()),
        Segment(len(head), verdict, (TokenLogprob(token=verdict, logprob=chosen, top=top),)),
        Segment(len(head) + len(verdict), "}$", ()),
    ]


@pytest.mark.parametrize("t", [0.6, 0.7, 1.0])
@pytest.mark.parametrize(
    ("lp_yes", "lp_no", "verdict"), [(-0.1, -2.4, "Yes"), (-1.8, -0.2, "No"), (-0.7, -0.69, "No")]
)
def test_raw_logprobs_give_the_ratio_after_temperature(
    t: float, lp_yes: float, lp_no: float, verdict: str
) -> None:
    """From raw logprobs and the sampling temperature, the reward is P(Yes)/(P(Yes)+P(No)) of the
    distribution after temperature, to 1e-9; processed logprobs give the plain ratio."""
    segments = _decision(lp_yes, lp_no, verdict)
    offset = segments[1].start
    word = verdict.lower()
    raw, source = reward_for(word, offset, segments, temperature=t)  # type: ignore[arg-type]
    assert source == "logprobs"
    assert abs(raw - after_temperature(lp_yes, lp_no, t)) < 1e-9
    processed, _ = reward_for(word, offset, segments)  # type: ignore[arg-type]
    assert abs(processed - math.exp(lp_yes) / (math.exp(lp_yes) + math.exp(lp_no))) < 1e-9


def test_greedy_raw_rewards_and_masked_answers_are_defined() -> None:
    """T = 0: the reward is 1 or 0 (0.5 on a tie); an answer masked to -inf gives exactly 1 or 0."""
    segments = _decision(-0.1, -2.4)
    assert reward_for("yes", segments[1].start, segments, temperature=0)[0] == 1.0
    tie = _decision(-0.5, -0.5)
    assert reward_for("yes", tie[1].start, tie, temperature=0)[0] == 0.5
    masked = _decision(-0.01, -math.inf)
    assert reward_for("yes", masked[1].start, masked, temperature=0.6) == (1.0, "logprobs")


async def test_processed_logprobs_from_the_config_give_the_plain_ratio(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({})
    report = await critic(model, template, local_pool, logprobs="processed").critique(PROBLEM, STEPS[:1])
    assert math.isclose(report.rewards[0], math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4)))


def test_a_number_for_logprobs_names_the_new_keys() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        CriticConfig(logprobs=20)  # type: ignore[arg-type]
    assert CriticConfig(top_logprobs=5).logprobs == "raw"


@pytest.mark.parametrize(
    ("judgement", "verdict", "reward"),
    [
        ("", "none", 0.5),
        ("I cannot decide.\n</verify>\n<output>\n**Judgement**: unclear\n</output>\n", "none", 0.5),
        ("ok\n</verify>\n<output>\n**Judgement**: $\\boxed{ yes }$\n</output>\n", "yes", None),
        ("ok\n</verify>\n<output>\n**Judgement**: $\\boxed{\\text{No}}$\n</output>\n", "no", None),
        ("\\boxed{No} then\n</verify>\n<output>\n$\\boxed{Yes}$ and $\\boxed{No}$\n</output>\n", "yes", None),
        ("<output>\n**Judgement**: $\\boxed{Ye", "none", 0.5),
        ("```python\nprint('unclosed fence'", "none", 0.5),
        ("\x00\ufffd garbage \\boxed{", "none", 0.5),
    ],
)
async def test_model_text_never_raises(
    template, local_pool, judgement: str, verdict: str, reward: float | None
) -> None:  # type: ignore[no-untyped-def]
    model = scripted_genprm({1: Plan(judgement=judgement, forced="garbage without a verdict")})
    report = await critic(model, template, local_pool).critique(PROBLEM, STEPS[:1])
    chain = report.step_reports[0].chains[0]
    if chain.forced:
        assert chain.verdict == "none" and chain.reward == 0.5
    else:
        assert chain.verdict == verdict
        if reward is not None:
            assert chain.reward == reward
        else:
            assert 0.0 < chain.reward < 1.0
            assert chain.reward_source in ("logprobs", "logprobs_bound", "hard_label")
    report.model_dump_json()  # the report is always serialisable


async def test_majority_of_n_chains_with_their_own_sessions(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    flips = iter(["Yes", "No", "Yes", "No"])
    verdict_of_chain: dict[int, str] = {}

    model = scripted_genprm({1: Plan(code=["import os\nprint(os.getpid())"])})
    inner = model._script

    def respond(prompt: str, params: SamplingParams) -> str:
        text = inner(prompt, params)  # type: ignore[operator]
        if "$\\boxed{Yes}$" in text:
            key = id(prompt)
            verdict_of_chain.setdefault(key, next(flips))
            text = text.replace("{Yes}", "{" + verdict_of_chain[key] + "}")
        return text

    model._script = respond
    report = await critic(model, template, local_pool, samples=4).critique(PROBLEM, STEPS[:1])
    step = report.step_reports[0]
    assert len(step.chains) == 4
    assert step.verdicts == {"yes": 2, "no": 2, "none": 0}
    assert math.isclose(step.reward, (2 * YES + 2 * NO) / 4)
    assert step.flagged == (step.reward < 0.5)
    pids = {c.code_runs[0].output for c in step.chains}
    assert len(pids) == 4, "every chain runs in its own sandbox session"
    # The one-shot critique returns without waiting for the clean-up, yet owns no session.
    assert local_pool.status().sessions == 0
    await local_pool.settle()
    alive = await asyncio.gather(*(_session_alive(local_pool, pid.strip()) for pid in pids))
    assert not any(alive), "every chain's worker is gone once the local_pool settles"


async def _session_alive(pool: SandboxPool, pid: str) -> bool:
    async with await pool.open_session() as probe:
        result = await probe.exec(
            f"import os\ntry:\n    os.kill({pid}, 0)\n    print('alive')\nexcept OSError:\n    print('gone')"
        )
    return result.stdout.strip() == "alive"


async def test_recritique_reuses_the_unchanged_prefix(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm(
        {
            1: Plan(code=["a = 5\nprint(a)"]),
            2: Plan(verdict="No", code=["print(a + 1)"]),
            3: Plan(code=["print(a * 2)"]),
        }
    )
    critic_ = critic(model, template, local_pool, samples=2)
    async with critic_.run(PROBLEM) as run:
        first = await run.critique(STEPS)
        assert first.first_error == 1
        calls_before = len(model.calls)
        model._script = scripted_genprm(
            {2: Plan(code=["print(a + 1)"]), 3: Plan(code=["print(a * 2)"])}
        )._script
        second = await run.critique([STEPS[0], "Then 2 + 12 = 14.", "The answer is \\boxed{14}."])
    new_calls = model.calls[calls_before:]
    assert {paragraph(p) for p, _ in new_calls} == {2, 3}, "no model call for the unchanged step"
    assert second.step_reports[0].reused and not second.step_reports[1].reused
    assert second.step_reports[0].chains == first.step_reports[0].chains
    assert second.all_pass
    # Each chain's sandbox went on from its state after step 1 (a = 5), not from scratch.
    assert [c.code_runs[0].output for c in second.step_reports[1].chains] == ["6", "6"]
    assert [c.code_runs[0].output for c in second.step_reports[2].chains] == ["10", "10"]
    assert second.usage.calls == len(new_calls)


async def test_snapshots_are_forked_only_before_the_session_runs_more_code(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    # A fork per passed step would hold 1 + 3 sessions here; the state after the last step is
    # still the working session's own, so only the snapshots after steps 1 and 2 are forks.
    model = scripted_genprm({1: Plan(code=["a = 5\nprint(a)"]), 3: Plan(code=["b = a * 2\nprint(b)"])})
    await local_pool.settle()
    before = local_pool.status().sessions
    async with critic(model, template, local_pool).run(PROBLEM) as run:
        first = await run.critique(STEPS, scan="all")
        assert first.all_pass
        assert local_pool.status().sessions - before == 3
        # A step appended after the last one goes on in the working session itself; its code
        # is what makes the snapshot after step 3 a fork (and the one after step 4 is not).
        model._script = scripted_genprm({4: Plan(code=["print(a + b)"])})._script
        second = await run.critique([*STEPS, "Check: 5 + 10 = 15."], scan="all")
        assert local_pool.status().sessions - before == 4
    assert [r.reused for r in second.step_reports] == [True, True, True, False]
    assert second.step_reports[3].chains[0].code_runs[0].output == "15"
    await local_pool.settle()
    assert local_pool.status().sessions == before


async def test_recritique_without_a_sandbox_rewinds_the_history(template) -> None:  # type: ignore[no-untyped-def]
    model = scripted_genprm({2: Plan(verdict="No")})
    async with critic(model, template, None, samples=2).run(PROBLEM) as run:
        assert (await run.critique(STEPS)).first_error == 1
        model._script = scripted_genprm({})._script
        second = await run.critique([STEPS[0], "Then 2 + 12 = 14.", "The answer is \\boxed{14}."])
    assert second.all_pass and second.step_reports[0].reused


async def test_a_rewritten_first_step_starts_from_a_fresh_sandbox(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    model = scripted_genprm({1: Plan(verdict="No", code=["leftover = 1\nprint(leftover)"])})
    async with critic(model, template, local_pool, samples=2).run(PROBLEM) as run:
        first = await run.critique(STEPS)
        assert first.first_error == 0
        model._script = scripted_genprm({1: Plan(code=["print('leftover' in globals())"])})._script
        second = await run.critique(["First, 3 * 4 is 12.", *STEPS[1:]])
    assert [c.code_runs[0].output for c in second.step_reports[0].chains] == ["False", "False"]
    assert second.all_pass


async def test_infrastructure_failures_raise_typed_errors(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    def down(prompt: str, params: SamplingParams) -> str:
        raise ModelEndpointError("http://127.0.0.1:9/v1/completions: gave up after 5 attempts")

    with pytest.raises(ModelEndpointError, match="gave up"):
        await critic(ScriptedCompletionModel(down), template, local_pool).critique(PROBLEM, STEPS)


async def test_without_a_sandbox_the_critic_judges_from_the_analysis(template) -> None:  # type: ignore[no-untyped-def]
    model = scripted_genprm({1: Plan(judgement="")})
    model.alternatives = DECISIONS

    def respond(prompt: str, params: SamplingParams) -> str:
        if prompt.endswith("$\\boxed"):
            return "{Yes}$\n</output>\n"
        return "Fine.\n</analyze>\n"

    model._script = respond
    report = await critic(model, template, None).critique(PROBLEM, STEPS[:1])
    chain = report.step_reports[0].chains[0]
    assert (chain.verdict, chain.forced, chain.code_runs) == ("yes", False, ())
    assert chain.text.endswith("Fine.\n</analyze>\n<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n")
    assert math.isclose(chain.reward, YES)


def test_segments_keep_tokens_only_where_a_verdict_can_lie() -> None:
    tokens = scripted_tokens("Looks fine.")
    assert segment_after("<analyze>\n", "Looks fine.", tokens).tokens == ()
    assert segment_after("x", "$\\boxed{Yes}$", tokens).tokens == tokens
    assert segment_after("**Judgement**: $\\boxed", "{No}$", tokens).tokens == tokens
    assert segment_after("x", "no logprobs", None).tokens is None  # hard-label mode stays visible
