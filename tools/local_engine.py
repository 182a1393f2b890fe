"""The in-process transformers engine: a Hugging Face folder or GGUF file, CPU or CUDA.

Requests that arrive together are batched into one forward pass per token (static batching):
a single worker runs one batch at a time, so two generate calls never race on one model. That
is what makes a GPU-served critic fast without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from critloop.errors import ConfigError, CritloopError
from critloop.tools._stops import find_stop
from critloop.tools.completion import (
    Completion,
    CompletionResult,
    LogprobsMode,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

__all__ = ["LogprobsMode", "TransformersEngine"]

logger = logging.getLogger("critloop.models")


@dataclass
class _Request:
    prompt: str
    params: SamplingParams
    future: asyncio.Future[CompletionResult]


@dataclass
class _Row:
    """One sample being generated."""

    request: int
    params: SamplingParams
    generator: Any
    ids: list[int] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    stop: str | None = None


class TransformersEngine:
    """A :class:`~critloop.tools.completion.CompletionModel` running a model in this process.

    Example:
        >>> engine = TransformersEngine("smollm2-135m-instruct")  # doctest: +SKIP
        >>> params = SamplingParams(max_tokens=4, temperature=0)
        >>> result = await engine.complete("2 + 2 =", params)  # doctest: +SKIP

    Args:
        model: a Hugging Face folder, a ``.gguf`` file, an embedded model name, or a hub id.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``, ``bfloat16``, ``float16``.
        max_batch_rows: most samples (rows) in one batch.
        logprobs_mode: see :data:`LogprobsMode`.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_rows: int = 64,
        logprobs_mode: LogprobsMode = "raw",
        name: str | None = None,
    ) -> None:
        self.model_ref = model
        self.name = name or Path(model).name or model
        self.device_name = device
        self.dtype_name = dtype
        self.max_batch_rows = max_batch_rows
        self.logprobs_mode = logprobs_mode
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0
        """How many batches ran (for tests and benchmarks: batching is observable)."""

    # ------------------------------------------------------------------ loading

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    def load(self) -> None:
        """Load the model and tokenizer (done on first use; call it to pay the cost early)."""
        with self._load_lock:
            if self._model is not None:
                return
            try:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError as exc:
                raise ConfigError(
                    "the local engine needs torch and transformers: pip install 'critloop[local]'"
                ) from exc
            from critloop.tools.embedded import resolve_model_path

            path = resolve_model_path(self.model_ref)
            device = self.device_name
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = self.dtype_name
            if dtype == "auto":
                dtype = "bfloat16" if device.startswith("cuda") else "float32"
            kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
            source = path
            if path.endswith(".gguf"):
                source, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {})
                )
                model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load model {self.model_ref!r}: {exc}") from exc
            model = model.to(device)
            model.eval()
            self._device = torch.device(device)
            self._tokenizer = tokenizer
            self._model = model
            logger.info("loaded %s on %s (%s)", self.model_ref, device, dtype)

    # ------------------------------------------------------------------ serving

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        if params.n > self.max_batch_rows:
            raise ValueError(f"n={params.n} exceeds the engine's max_batch_rows={self.max_batch_rows}")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve(), name=f"critloop-engine-{self.name}")
        future: asyncio.Future[CompletionResult] = loop.create_future()
        assert self._queue is not None
        await self._queue.put(_Request(prompt, params, future))
        return await future

    async def _serve(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(0)  # requests of the same tick join this batch
            rows = batch[0].params.n
            while not queue.empty():
                nxt = queue._queue[0]  # type: ignore[attr-defined]  # peek: stop at the row budget
                if rows + nxt.params.n > self.max_batch_rows:
                    break
                batch.append(queue.get_nowait())
                rows += nxt.params.n
            batch = [r for r in batch if not r.future.cancelled()]
            if not batch:
                continue
            try:
                # A caller that gave up (a time budget, a client gone) cancels its future: its rows
                # stop at the next token instead of generating to the end.
                abandoned = [r.future.cancelled for r in batch]
                results = await asyncio.to_thread(
                    self._generate, [(r.prompt, r.params) for r in batch], abandoned
                )
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                error = (
                    exc if isinstance(exc, CritloopError) else CritloopError(f"local engine failed: {exc!r}")
                )
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    async def aclose(self) -> None:
        """Stop serving in this event loop. The weights stay loaded: a later call, in this loop
        or another, serves again at once (drop the engine to free them)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._worker
        self._worker = None

    async def __aenter__(self) -> TransformersEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ generation

    def _generate(
        self,
        requests: list[tuple[str, SamplingParams]],
        abandoned: Sequence[Callable[[], bool]] = (),
    ) -> list[CompletionResult]:
        self.load()
        with self._run_lock:
            import torch

            with torch.inference_mode():
                result = self._generate_batch(requests, abandoned)
            self.batches_run += 1
            return result

    def _generate_batch(
        self, requests: list[tuple[str, SamplingParams]], abandoned: Sequence[Callable[[], bool]] = ()
    ) -> list[CompletionResult]:
        import torch

        tok, model, device = self._tokenizer, self._model, self._device
        prompt_ids = [tok(prompt)["input_ids"] for prompt, _ in requests]
        rows: list[_Row] = []
        for index, (_prompt, params) in enumerate(requests):
            for sample in range(params.n):
                generator = torch.Generator(device="cpu")
                seed = params.seed + sample if params.seed is not None else random.getrandbits(63)
                generator.manual_seed(seed)
                rows.append(_Row(request=index, params=params, generator=generator))
        n_rows = len(rows)
        width = max(len(prompt_ids[r.request]) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        input_ids = torch.full((n_rows, width), pad, dtype=torch.long)
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = prompt_ids[row.request]
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        vocab = model.config.vocab_size
        seen = torch.zeros((n_rows, vocab), dtype=torch.bool)
        seen.scatter_(1, input_ids.clamp(max=vocab - 1), mask.bool())
        penalty = torch.tensor([[r.params.repetition_penalty] for r in rows], dtype=torch.float32)
        temperature = torch.tensor([[r.params.temperature] for r in rows], dtype=torch.float32)
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
        eos_ids.discard(None)
        max_new = max(r.params.max_tokens for r in rows)
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # transformers 5 calls the KV cache `cache`; 4.x called it `past_key_values`.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        past = getattr(out, cache_arg)
        for _step in range(max_new):
            for row in rows:
                if row.finish is None and abandoned and abandoned[row.request]():
                    row.finish = "length"  # nobody waits for it: cut here
            logits = out.logits[:, -1, :vocab].float().cpu()
            chosen = self._step(rows, logits, seen, penalty, temperature, eos_ids)
            if all(r.finish is not None for r in rows):
                break
            next_ids = torch.tensor(chosen, dtype=torch.long, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((n_rows, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=next_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: past},
            )
            past = getattr(out, cache_arg)
        return self._results(requests, prompt_ids, rows)

    def _step(
        self, rows: list[_Row], logits: Any, seen: Any, penalty: Any, temperature: Any, eos_ids: set[int]
    ) -> list[int]:
        """Choose the next token of every row; update text, logprobs and finish state."""
        import torch

        penalised = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        greedy = temperature <= 0
        scaled = penalised / torch.where(greedy, torch.ones_like(temperature), temperature)
        logprobs = torch.log_softmax(scaled if self.logprobs_mode == "processed" else logits, dim=-1)
        chosen: list[int] = []
        for i, row in enumerate(rows):
            if row.finish is not None:
                chosen.append(0)
                continue
            params = row.params
            if params.temperature <= 0:
                token = int(torch.argmax(scaled[i]))
            else:
                token = self._sample(scaled[i], params, row.generator)
            chosen.append(token)
            seen[i, token] = True
            if token in eos_ids:
                row.finish = "stop"
                continue
            row.ids.append(token)
            if params.logprobs is not None:
                row.tokens.append(self._token_logprob(token, logprobs[i], params.logprobs))
            self._check_stop(row)
            if row.finish is None and len(row.ids) >= params.max_tokens:
                row.finish = "length"
                row.text = self._tokenizer.decode(row.ids, skip_special_tokens=True)
        return chosen

    @staticmethod
    def _sample(scores: Any, params: SamplingParams, generator: Any) -> int:
        import torch

        if params.top_k > 0 and params.top_k < scores.numel():
            threshold = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > params.top_p  # keep the token crossing p
            scores = scores.clone()
            scores[order[drop]] = float("-inf")
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _token_logprob(self, token: int, logprobs: Any, k: int) -> TokenLogprob:
        import torch

        top: list[TopLogprob] = []
        if k > 0:
            values, indices = torch.topk(logprobs, k)
            top = [
                TopLogprob(token=self._piece(int(t)), id=int(t), logprob=float(v))
                for v, t in zip(values.tolist(), indices.tolist(), strict=True)
            ]
        chosen = TopLogprob(token=self._piece(token), id=token, logprob=float(logprobs[token]))
        if all(t.id != token for t in top):
            top.append(chosen)
        return TokenLogprob(token=chosen.token, id=token, logprob=chosen.logprob, top=tuple(top))

    def _piece(self, token: int) -> str:
        return _decode_one(self._tokenizer, token)

    def _check_stop(self, row: _Row) -> None:
        stops = row.params.stop
        if not stops:
            return
        previous = len(row.text)
        row.text = self._tokenizer.decode(row.ids, skip_special_tokens=True)
        longest = max(len(s) for s in stops)
        found = find_stop(row.text, stops, start=max(0, previous - longest + 1))
        if found is not None:
            index, stop = found
            row.text = row.text[: index + len(stop)] if row.params.include_stop else row.text[:index]
            row.finish, row.stop = "stop", stop

    def _results(
        self, requests: list[tuple[str, SamplingParams]], prompt_ids: list[list[int]], rows: list[_Row]
    ) -> list[CompletionResult]:
        results = []
        for index, (_prompt, params) in enumerate(requests):
            mine = [r for r in rows if r.request == index]
            choices = []
            for row in mine:
                if row.finish is None:  # the batch ran out of steps for this row
                    row.finish = "length"
                if row.stop is None:
                    row.text = self._tokenizer.decode(row.ids, skip_special_tokens=True)
                choices.append(
                    Completion(
                        text=row.text,
                        finish_reason="stop" if row.finish == "stop" else "length",
                        stop=row.stop,
                        tokens=tuple(row.tokens) if params.logprobs is not None else None,
                        completion_tokens=len(row.ids)
                        + (1 if row.finish == "stop" and row.stop is None else 0),
                    )
                )
            results.append(
                CompletionResult(
                    choices=tuple(choices),
                    prompt_tokens=len(prompt_ids[index]),
                    completion_tokens=sum(c.completion_tokens for c in choices),
                    model=self.name,
                )
            )
        return results


@lru_cache(maxsize=1 << 17)
def _decode_cached(tokenizer_id: int, token: int) -> str:
    return _TOKENIZERS[tokenizer_id].decode([token])


_TOKENIZERS: dict[int, Any] = {}


def _decode_one(tokenizer: Any, token: int) -> str:
    key = id(tokenizer)
    _TOKENIZERS.setdefault(key, tokenizer)
    return _decode_cached(key, token)
