"""The user-facing API: `LLM(model, backend=...).generate(prompts, params)` and `.stream(...)`."""
from __future__ import annotations

import numbers
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from nanovllm_jax.config import EngineConfig
from nanovllm_jax.llm_engine import LLMEngine, Prompt
from nanovllm_jax.outputs import RequestOutput, StreamDelta
from nanovllm_jax.sampling_params import SamplingParams

ParamsArg = SamplingParams | Sequence[SamplingParams] | None
PromptArg = Prompt | tuple[int, ...] | np.ndarray | dict  # dict: vLLM's {"prompt": str} or {"prompt_token_ids": ids}


class LLM:
    def __init__(self, model: str | None = None, backend: str = "jax", **engine_kwargs):
        self.config = EngineConfig.from_kwargs(model, backend, **engine_kwargs)
        self.engine = LLMEngine(self.config)
        # Several generate()/stream() calls may be open at once (a stream is consumed lazily), and the
        # one that steps the engine gets every request's deltas: it keeps the others' for their owners.
        self._open: set[int] = set()  # the requests of open calls
        self._backlog: dict[int, list[StreamDelta]] = {}  # deltas that one call stepped for another
        self._lock = threading.RLock()  # calls may run in several threads: they hand deltas over under it

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptArg | Sequence[PromptArg], sampling_params: ParamsArg = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        ids = self._add_all(prompts, sampling_params)
        outputs: dict[int, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            for deltas in self._steps(ids):
                for delta in deltas:
                    if delta.finished:
                        outputs[delta.request_id] = self.engine.release(delta.request_id)
                        bar.update(1)
                stats = self.engine.last_step
                if stats["seconds"] > 0:
                    if stats["prefill_tokens"]:
                        prefill_tps = stats["prefill_tokens"] / stats["seconds"]
                    elif stats["decode_tokens"]:
                        decode_tps = stats["decode_tokens"] / stats["seconds"]
                    bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
        finally:
            bar.close()
            self._abort_unfinished(ids, outputs)
        return [outputs[i] for i in ids]

    def chat(self, conversations: list[dict] | list[list[dict]], sampling_params: ParamsArg = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or several, via the chat template."""
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("conversations must be a conversation (a list of {'role', 'content'} messages) or a "
                             f"non-empty list of them, got {_describe(conversations)}")
        if isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def chat_prompt(self, conversation: list[dict]) -> list[int]:
        """The prompt token ids of a conversation, ready for the assistant's reply."""
        _check_conversation(conversation)
        text = self.tokenizer.apply_chat_template(conversation)
        # The template already holds the BOS token, so the text is encoded without specials.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompts: PromptArg | Sequence[PromptArg],
               sampling_params: ParamsArg = None) -> Iterator[StreamDelta]:
        """Yield each request's new tokens and text as they are produced; `index` is the prompt's position."""
        ids = self._add_all(prompts, sampling_params)
        index_of = {request_id: index for index, request_id in enumerate(ids)}
        done: dict[int, RequestOutput] = {}
        try:
            for deltas in self._steps(ids):
                for delta in deltas:
                    if delta.finished:
                        done[delta.request_id] = self.engine.release(delta.request_id)
                    if delta.token_ids or delta.text or delta.finished:
                        delta.index = index_of[delta.request_id]  # each delta has one reader: this call
                        yield delta
        finally:
            self._abort_unfinished(ids, done)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block (e.g. between benchmark runs of the same prompts).
        Returns False, changing nothing, while requests are still running."""
        return self.engine.reset_prefix_cache()

    def _add_all(self, prompts: PromptArg | Sequence[PromptArg], sampling_params: ParamsArg) -> list[int]:
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        with self._lock:
            ids = self.engine.add_requests(prompts, params)
            self._open.update(ids)
        return ids

    def _steps(self, ids: list[int]) -> Iterator[list[StreamDelta]]:
        """The deltas of requests `ids`, a step's worth at a time, until all have finished: first those
        another call left for them, else the next engine step's. Another open call's deltas are kept for it."""
        mine, finished = set(ids), set()
        while len(finished) < len(ids):
            with self._lock:
                deltas = [d for i in ids for d in self._backlog.pop(i, [])] if self._backlog else []
                ours = []
                for delta in deltas or self.engine.step():
                    if delta.request_id in mine:
                        ours.append(delta)
                        if delta.finished:
                            finished.add(delta.request_id)
                    elif delta.request_id in self._open:
                        self._backlog.setdefault(delta.request_id, []).append(delta)
                gone = [] if ours else [i for i in ids if i not in finished and i not in self.engine.requests]
            if gone:
                raise RuntimeError(f"requests {gone} were released (engine.release) while this call waited on them")
            yield ours

    def _abort_unfinished(self, ids: list[int], finished: dict) -> None:
        """A call ends (done, failed or closed early): abort and forget what it left running."""
        with self._lock:
            for request_id in ids:
                self._open.discard(request_id)
                self._backlog.pop(request_id, None)
                if request_id not in finished and request_id in self.engine.requests:
                    self.engine.abort(request_id)
                    self.engine.release(request_id)


def _check_conversation(conversation) -> None:
    """A list of messages, each a dict with a string role and a content (any the template takes: text, parts,
    a tool's JSON), or none where the message calls tools (OpenAI's form)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {_describe(conversation)}")
    for i, message in enumerate(conversation):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and (message.get("content") is not None or message.get("tool_calls"))):
            raise ValueError(f"message {i} must be a dict with a string 'role' and a 'content', got {_describe(message)}")


def _describe(value) -> str:
    """A bad argument's shape for an error message: types, not the user's text."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (list, tuple)) and not value:
        return repr(value)
    return type(value).__name__


def _as_list(prompts) -> list[Prompt]:
    """One prompt or a sequence of them, as a list of strings and token-id sequences."""
    if (isinstance(prompts, (str, dict)) or _is_token_ids(prompts) or not isinstance(prompts, Iterable)
            or (isinstance(prompts, np.ndarray) and prompts.ndim == 0)):
        prompts = [prompts]
    prompts = [_from_dict(p) if isinstance(p, dict) else p for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _is_token_ids(prompts) -> bool:
    """Whether `prompts` is one prompt of token ids (a 1-D array, or a list or tuple of numbers)."""
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    return isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], numbers.Number)


def _from_dict(prompt: dict) -> Prompt:
    """vLLM's dict prompts: {"prompt": text} or {"prompt_token_ids": token ids}."""
    if list(prompt) == ["prompt"] and isinstance(prompt["prompt"], str):
        return prompt["prompt"]
    if list(prompt) == ["prompt_token_ids"] and isinstance(prompt["prompt_token_ids"], (list, tuple, np.ndarray)):
        return prompt["prompt_token_ids"]
    raise ValueError(
        f"a dict prompt must be {{'prompt': str}} or {{'prompt_token_ids': list of token ids}}, got {_describe(prompt)}"
    )


def _per_prompt(sampling_params: ParamsArg, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if not isinstance(sampling_params, Iterable) or isinstance(sampling_params, (str, bytes, dict)):
        raise ValueError("sampling_params must be a SamplingParams, a list of them or None, "
                         f"got {type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
