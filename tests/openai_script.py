"""A scripted OpenAI ``/v1/completions`` responder that plays a policy and a GenPRM critic, for
end-to-end runs of the CLI against a real HTTP server (:class:`scripted_server.ScriptedServer`)."""

from __future__ import annotations

import json
from collections.abc import Callable

from scripted_server import Recorded, Reply

SOLUTION = "Multiply first: 3 * 4 = 12.\n\nThen add: 2 + 12 = 14.\n\nThe answer is $\\boxed{14}$."


def completion(text: str, stop: str | None, prompt: str) -> dict:
    return {
        "id": "cmpl-scripted",
        "object": "text_completion",
        "model": "scripted",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "stop_reason": stop}],
        "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": max(1, len(text) // 4)},
    }


def policy_and_critic(
    delay: float = 0.0, solution: str | Callable[[str], str] = SOLUTION
) -> Callable[[Recorded], Reply]:
    """Answers each request by what its prompt asks: a solution (``solution``, or what it gives
    for the prompt), or a stage of a critique that writes code once and says Yes (no logprobs:
    hard-label rewards)."""

    def reply(request: Recorded) -> Reply:
        prompt = json.loads(request.body)["prompt"]
        if prompt.endswith("step by step: "):
            body = completion("It checks out.\n</analyze>\n", "</analyze>\n", prompt)
        elif prompt.endswith("```python\n"):
            body = completion("print(12)\n```\n", "\n```\n", prompt)
        elif prompt.endswith("```\n") and "[Code Output]" in prompt[-4096:]:
            verdict = "</verify>\n<output>\n**Judgement**: $\\boxed{Yes}$\n</output>\n"
            body = completion(verdict, "</output>\n", prompt)
        elif prompt.endswith("\\boxed"):
            body = completion("{Yes}$\n</output>\n", "</output>\n", prompt)
        else:
            body = completion(solution(prompt) if callable(solution) else solution, None, prompt)
        return Reply(200, body, delay=delay)

    return reply
