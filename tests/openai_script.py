"""A scripted OpenAI ``/v1/completions`` responder that plays a policy and a GenPRM critic, for
end-to-end runs of the CLI against a real HTTP server (:class:`scripted_server.ScriptedServer`),
and the datasets, configs and crashes of those runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from model_fixtures import TOKENIZER_DIR
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


def scripted_config(folder: Path, url: str) -> Path:
    """``folder/critloop.toml``: the policy and a GenPRM critic (one chain) on the scripted server
    at ``url``, one refinement round, the local sandbox."""
    endpoint = f'kind = "openai"\nbase_url = "{url}/v1"\nmodel = "scripted"\ntokenizer = "{TOKENIZER_DIR}"\n'
    config = folder / "critloop.toml"
    config.write_text(
        f'[policy]\n{endpoint}\n[critic]\n{endpoint}profile = "genprm"\nsamples = 1\n'
        '[budget]\nmax_rounds = 1\n[sandbox]\nbackend = "local"\npool_size = 1\n'
    )
    return config


def dataset(folder: Path, n: int, *, broken: bool = True) -> Path:
    """``folder/problems.jsonl``: ``n`` copies of 2 + 3 * 4 (ids q00, q01, ...; q01's gold is the
    wrong 15), and a last line that is not JSON when ``broken``."""
    rows = [
        {"id": f"q{i:02d}", "problem": f"What is 2 + 3 * 4? (copy {i})", "answer": "14"} for i in range(n)
    ]
    rows[1]["answer"] = "15"
    path = folder / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + ("{broken\n" if broken else ""))
    return path


def kill_when_written(args: list[str], out: Path, records: int = 4) -> bytes:
    """Start the command ``args``, SIGKILL it once ``out`` holds ``records`` finished lines, and
    return what ``out`` held then."""
    started = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len([line for line in _lines(out) if line.endswith(b"\n")]) < records:
            assert started.poll() is None, started.stderr.read() if started.stderr else ""
            assert time.monotonic() < deadline, f"the command wrote {records} records in 300 s"
            time.sleep(0.02)  # polling another process's file: there is nothing to await
        os.kill(started.pid, signal.SIGKILL)
    finally:
        started.wait(timeout=30)
    assert started.returncode == -signal.SIGKILL
    return out.read_bytes()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def policy_and_teacher() -> Callable[[Recorded], Reply]:
    """Answers ``critloop synth``'s requests by what each prompt asks, ``n`` choices each, the
    same for the same prompt and choice index: step-forced paths and prefix completions right
    (answer 14) at even indices and wrong (15) at odd ones; a teacher that checks paragraph 1
    with ``print(3 * 4)``, paragraph 2 with ``print(2 + 12)``, and answers -1."""

    def reply(request: Recorded) -> Reply:
        body = json.loads(request.body)
        prompt, n = body["prompt"], int(body.get("n") or 1)
        if "<paragraph_1>" in prompt:
            runs = prompt.count("[Code Output]\n")
            if runs < 2:
                verified = ("It multiplies.", "print(3 * 4)") if runs == 0 else ("It adds.", "print(2 + 12)")
                lead = "" if runs == 0 else "It prints 12.\n</verify>\n"
                text = (
                    f"{lead}### Paragraph {runs + 1}\n<analyze>\n{verified[0]}\n</analyze>\n"
                    f"<verify>\n```python\n{verified[1]}\n```\n"
                )
                stop: str | None = "\n```\n"
            else:
                text, stop = "It prints 14.\n</verify>\nNo paragraph is wrong: $\\boxed{-1}$.", None
            texts = [text] * n
        elif prompt.endswith("Step 1: "):
            texts = [
                f"3 * 4 = 12.\nStep 2: 2 + 12 = {14 + i % 2}, so $\\boxed{{{14 + i % 2}}}$." for i in range(n)
            ]
            stop = None
        else:  # a prefix to complete
            texts = [f"2: So the answer is $\\boxed{{{14 + i % 2}}}$." for i in range(n)]
            stop = None
        choices = [
            {"index": i, "text": t, "finish_reason": "stop", "stop_reason": stop} for i, t in enumerate(texts)
        ]
        usage = {
            "prompt_tokens": len(prompt) // 4,
            "completion_tokens": sum(max(1, len(t) // 4) for t in texts),
        }
        return Reply(
            200,
            {
                "id": "cmpl-scripted",
                "object": "text_completion",
                "model": "scripted",
                "choices": choices,
                "usage": usage,
            },
        )

    return reply
