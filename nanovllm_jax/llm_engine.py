"""The engine loop: add requests, schedule a step, run it on the backend, apply stop rules."""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import xxhash

from nanovllm_jax.block_manager import BlockManager
from nanovllm_jax.config import EngineConfig
from nanovllm_jax.default_model import resolve_model
from nanovllm_jax.detokenizer import IncrementalDetokenizer
from nanovllm_jax.outputs import Logprob, RequestOutput, StreamDelta
from nanovllm_jax.runner import (MAX_BANNED_IDS, SAMPLING_FLOAT_FIELDS, ModelRunner, PendingOutput, SamplingBatch,
                                 StepBatch)
from nanovllm_jax.sampling_params import SamplingParams
from nanovllm_jax.scheduler import ScheduledBatch, Scheduler
from nanovllm_jax.sequence import PENDING, Sequence, SequenceStatus
from nanovllm_jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Prompt = str | list[int]


def _serialized(method):
    """Runs under the engine's lock: another thread may abort() while generate() steps."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def create_backend(config: EngineConfig) -> tuple[ModelRunner, Tokenizer]:
    if config.backend == "mock" and config.model is None:
        from backends.mock import MockRunner, simple_bpe_tokenizer

        tokenizer = simple_bpe_tokenizer()
        return MockRunner(config, tokenizer.vocab_size), tokenizer
    model_dir = resolve_model(config.model)  # None: the embedded default; a .gguf is converted once
    config.model = str(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if config.backend == "mock":
        from backends.mock import MockRunner

        return MockRunner(config, tokenizer.vocab_size), tokenizer
    if config.backend == "jax":
        from nanovllm_jax.jax_runner import JaxRunner

        return JaxRunner(config), tokenizer
    from backends.onnx import OnnxRunner

    return OnnxRunner(config), tokenizer


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    logprobs: list[Logprob] | None
    max_stop_len: int
    banned_ids: list[int]
    stop_ids: frozenset[int]  # stop_token_ids, and the EOS ids unless ignore_eos
    sampling_row: tuple[float, ...]  # its SAMPLING_FLOAT_FIELDS values, fixed at add
    top_k: int  # 0: off
    text_end: int | None = None  # set when a stop string cut the text
    searched: int = 0  # text length already searched for stop strings
    emitted: int = 0  # text length already streamed
    emitted_until: int = 0  # seq.token_ids already streamed (the prompt counts as streamed)

    @property
    def text(self) -> str:
        return self.detokenizer.text[: self.text_end]


@dataclass(frozen=True)
class _InFlight:
    pending: PendingOutput
    sampled: list[tuple[int, Sequence]]  # (row, sequence) of each row that samples a token


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner, self.tokenizer = create_backend(config)
        vocab = self.runner.vocab_size
        # an EOS id the model cannot sample stops nothing, and banning it (min_tokens) would index past the logits
        self.eos_token_ids = frozenset(t for t in self.tokenizer.eos_token_ids if 0 <= t < vocab)
        if len(self.eos_token_ids) < len(self.tokenizer.eos_token_ids):
            log.warning("EOS ids %s are outside the model's vocabulary (%d): ignored",
                        sorted(set(self.tokenizer.eos_token_ids) - self.eos_token_ids), vocab)
        self.block_manager = BlockManager(
            self.runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self.last_step = {"prefill_tokens": 0, "decode_tokens": 0, "seconds": 0.0}
        self._in_flight: _InFlight | None = None
        self._unreported: dict[int, _Request] = {}  # aborted since the last step, which reports them
        self._carried: list[StreamDelta] = []  # read by a step whose read-back then failed: the next step returns them
        self._lock = threading.RLock()

    # ---- requests -------------------------------------------------------------------------

    def validate(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Check one request without touching engine state; returns its prompt token ids."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []  # not just the BOS a tokenizer adds
        elif isinstance(prompt, np.ndarray) and prompt.ndim != 1:
            raise ValueError(f"a prompt of token ids must be one-dimensional, got an array of shape {prompt.shape}")
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            not_ints = [t for t in prompt if not _is_token_id(t)]
            if not_ints:
                raise ValueError(f"prompt token ids must be integers, got {not_ints[:5]!r}")
            token_ids = [int(t) for t in prompt]
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.runner.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:  # a string too: a tokenizer may hold more tokens than the model's embedding
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if not token_ids:
            raise ValueError("prompt is empty")
        max_len = self.config.max_model_len
        max_tokens = self._max_tokens(params, len(token_ids))
        implied = " (max_tokens=None: up to max_model_len)" if params.max_tokens is None else ""
        if params.max_tokens is None and max_tokens < max(params.min_tokens, 1):
            raise ValueError(f"prompt ({len(token_ids)} tokens) leaves no room for min_tokens "
                             f"({params.min_tokens}) or one token in max_model_len ({max_len})")
        if len(token_ids) + max_tokens > max_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len ({max_len})"
            )
        # the last token sampled is never fed back, so it needs no K/V slot
        needed = self.block_manager.blocks_needed(len(token_ids) + max_tokens - 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs {needed} KV blocks{implied} but the cache holds {self.block_manager.num_blocks}; "
                "raise num_kvcache_blocks or lower max_tokens"
            )
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be < vocab size {vocab}, got {bad_stop}")
        banned = len(self._banned_ids(params))
        if banned > MAX_BANNED_IDS:
            raise ValueError(f"with min_tokens, stop_token_ids and the EOS ids ({banned} in all) may number "
                             f"at most {MAX_BANNED_IDS}")
        return token_ids

    def _banned_ids(self, params: SamplingParams) -> list[int]:
        """The ids masked while a request is below min_tokens: its stop_token_ids and the EOS ids, these
        even with ignore_eos (as in vLLM, whose min-tokens processor masks every EOS id it knows)."""
        if params.min_tokens == 0:
            return []
        return sorted(set(params.stop_token_ids) | self.eos_token_ids)

    def _max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        """max_tokens None: as many as max_model_len leaves (as in vLLM)."""
        return params.max_tokens if params.max_tokens is not None else self.config.max_model_len - prompt_len

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        return self.add_requests([prompt], [params if params is not None else SamplingParams()])[0]

    def add_requests(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[int]:
        """Validate every request first (a bad one adds none), then add them all; returns their ids.
        Each request keeps a copy of its params, checked again: changing the caller's object (before
        or after) cannot put unchecked values into a step."""
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts and {len(params)} sampling params")
        params = [replace(p) if isinstance(p, SamplingParams) else p for p in params]
        token_ids = [self.validate(prompt, p) for prompt, p in zip(prompts, params)]
        with self._lock:
            return [self._add(*request) for request in zip(prompts, params, token_ids)]

    def _add(self, prompt: Prompt, params: SamplingParams, token_ids: list[int]) -> int:
        request_id = next(self._ids)
        seed = params.seed if params.seed is not None else xxhash.xxh32_intdigest(
            f"{self.config.seed}:{request_id}".encode()
        )
        seq = Sequence(request_id, token_ids, params, seed, self._max_tokens(params, len(token_ids)))
        self.requests[request_id] = _Request(
            seq=seq,
            prompt=prompt if isinstance(prompt, str) else None,
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids),
            logprobs=[] if params.logprobs is not None else None,
            max_stop_len=max((len(s) for s in params.stop), default=0),
            emitted_until=len(token_ids),
            stop_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids),
            banned_ids=self._banned_ids(params),
            sampling_row=tuple(0.0 if name == "temperature" and params.greedy else getattr(params, name)
                               for name in SAMPLING_FLOAT_FIELDS),
            # as in vLLM, a top_k of the whole vocabulary or more keeps every token: off (and int32-safe)
            top_k=params.top_k if 0 < params.top_k < self.runner.vocab_size else 0,
        )
        self.scheduler.add(seq)
        return request_id

    @_serialized
    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block; False, changing nothing, while requests are still running."""
        return self.block_manager.reset_prefix_cache()

    @_serialized
    def abort(self, request_id: int) -> None:
        """Stop a request; the next step reports it finished with finish_reason "abort"."""
        request = self.requests.get(request_id)
        if request is not None and not request.seq.is_finished:
            self.scheduler.finish(request.seq, "abort")
            self._unreported[request_id] = request

    @_serialized
    def has_unfinished(self) -> bool:
        """Requests still running, or with news step() has not returned yet."""
        return self.scheduler.has_unfinished() or bool(self._unreported) or bool(self._carried)

    @_serialized
    def get_output(self, request_id: int) -> RequestOutput:
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"no request {request_id}: it was never added or is already released")
        seq = request.seq
        return RequestOutput(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=request.text,
            finish_reason=seq.finish_reason,
            logprobs=None if request.logprobs is None else list(request.logprobs),  # a snapshot, as token_ids
            num_cached_tokens=seq.num_cached_tokens,
        )

    @_serialized
    def release(self, request_id: int) -> RequestOutput:
        """The finished request's output; the engine forgets it."""
        output = self.get_output(request_id)
        if not output.finished:
            raise ValueError(f"request {request_id} is still running; abort it first")
        del self.requests[request_id]
        self._unreported.pop(request_id, None)  # released: nobody waits for its report
        return output

    # ---- the step -------------------------------------------------------------------------

    @_serialized
    def step(self) -> list[StreamDelta]:
        """Schedule and submit one step, then read back the step submitted before it (so the device
        runs this one meanwhile); returns what each request that progressed in that one gained."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        in_flight = self._submit(scheduled) if scheduled else None  # its inputs may name rows of the last one
        previous, self._in_flight = self._in_flight, in_flight
        deltas, self._carried = self._carried, []
        try:
            if previous:
                self._read_back(previous, deltas)
        except BaseException:  # KeyboardInterrupt too (Ctrl-C lands in the wait for the device): the engine
            # goes on; what was read comes with the next step, the rest lost a token
            self._carried = deltas
            self._abort_rows(previous)
            raise
        deltas += [self._take_delta(request) for request in self._unreported.values()]
        self._unreported.clear()
        if self._in_flight and not self.scheduler.has_unfinished():
            # every request it computes for has stopped: wait for it, so no step outlives the work
            self._in_flight, idle = None, self._in_flight
            try:
                idle.pending.result()
            except BaseException:  # its requests have all stopped; what was read above comes with the next step
                self._carried = deltas
                raise
        decode_tokens = sum(1 for seq, n in scheduled if n == 1 and seq.num_computed_tokens > seq.num_prompt_tokens)
        self.last_step = {
            "prefill_tokens": sum(n for _, n in scheduled) - decode_tokens,
            "decode_tokens": decode_tokens,
            "seconds": time.perf_counter() - start,
        }
        return deltas

    def _submit(self, scheduled: ScheduledBatch) -> _InFlight:
        batch = self._build_batch(scheduled)
        pending = self.runner.submit(batch)
        self.scheduler.mark_computed(scheduled)
        sampled = [(row, seq) for row, (seq, _) in enumerate(scheduled) if batch.needs_sample[row]]
        for _, seq in sampled:
            seq.add_pending()
        return _InFlight(pending, sampled)

    def _read_back(self, step: _InFlight, deltas: list[StreamDelta]) -> None:
        output = step.pending.result()
        tokens = output.token_ids.tolist()
        for row, seq in step.sampled:
            if seq.is_finished:  # stopped by the step before, or aborted: the row's token is dropped
                continue
            deltas.append(self._append_token(self.requests[seq.seq_id], tokens[row], row, output))
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq)

    def _abort_rows(self, step: _InFlight) -> None:
        for _, seq in step.sampled:
            if not seq.is_finished:
                self.abort(seq.seq_id)

    def _build_batch(self, scheduled: ScheduledBatch) -> StepBatch:
        """The step's numpy arrays, built with whole-array operations (a per-row loop of small
        numpy calls cost ~2 ms per step at 256 sequences)."""
        bs = self.config.kvcache_block_size
        seqs = [seq for seq, _ in scheduled]
        num_seqs = len(seqs)
        num_new = np.fromiter((n for _, n in scheduled), np.int32, num_seqs)
        starts = np.fromiter((seq.num_computed_tokens for seq in seqs), np.int32, num_seqs)
        query_start = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(num_new, out=query_start[1:])
        rows = np.repeat(np.arange(num_seqs), num_new)
        positions = (np.arange(query_start[-1], dtype=np.int32) - query_start[rows] + starts[rows]).astype(np.int32)
        table_lens = np.fromiter((len(seq.block_table) for seq in seqs), np.int32, num_seqs)
        block_tables = np.full((num_seqs, self.config.max_blocks_per_seq), -1, dtype=np.int32)
        block_tables[np.arange(block_tables.shape[1]) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(seq.block_table for seq in seqs), np.int32, int(table_lens.sum()))
        input_ids = np.fromiter(itertools.chain.from_iterable(
            seq.token_ids[start: start + n] for seq, start, n in zip(seqs, starts.tolist(), num_new.tolist())
        ), np.int32, int(query_start[-1]))
        context_lens = starts + num_new
        return StepBatch(
            input_ids=input_ids,
            prev_rows=self._prev_rows(seqs, rows, input_ids),
            positions=positions,
            slot_mapping=(block_tables[rows, positions // bs] * bs + positions % bs).astype(np.int32),
            query_start=query_start,
            context_lens=context_lens,
            block_tables=block_tables,
            logits_indices=query_start[1:] - 1,
            needs_sample=context_lens == np.fromiter(map(len, seqs), np.int32, num_seqs),
            sampling=self._sampling_batch(seqs),
        )

    def _prev_rows(self, seqs: list[Sequence], rows: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """Per token, the in-flight step's row that samples it (-1 where the token is known)."""
        prev_rows = np.full(len(input_ids), -1, np.int32)
        pending = input_ids == PENDING
        if pending.any():
            row_of = {seq.seq_id: row for row, seq in self._in_flight.sampled}
            prev_rows[pending] = [row_of[seqs[r].seq_id] for r in rows[pending]]
        return prev_rows

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        requests = [self.requests[seq.seq_id] for seq in seqs]
        banned_rows = {row: request.banned_ids for row, (seq, request) in enumerate(zip(seqs, requests))
                       if request.banned_ids and seq.num_sampled_tokens < seq.params.min_tokens}
        banned = np.full((len(seqs), max(map(len, banned_rows.values()), default=1)), -1, dtype=np.int32)
        for row, ids in banned_rows.items():
            banned[row, : len(ids)] = ids
        floats = np.array([r.sampling_row for r in requests], np.float32).reshape(len(seqs), len(SAMPLING_FLOAT_FIELDS))
        wanted = [seq.params.logprobs for seq in seqs if seq.params.logprobs is not None]
        return SamplingBatch(
            **dict(zip(SAMPLING_FLOAT_FIELDS, np.ascontiguousarray(floats.T))),
            top_k=np.array([r.top_k for r in requests], dtype=np.int32),
            seeds=np.array([seq.seed for seq in seqs], dtype=np.uint32),
            prompt_lens=np.array([seq.num_prompt_tokens for seq in seqs], dtype=np.int32),
            banned_token_ids=banned,
            # logprobs=0 still wants the sampled token's logprob, so ask for at least one
            num_logprobs=max(max(wanted), 1) if wanted else 0,
        )

    def _append_token(self, request: _Request, token: int, row: int, output) -> StreamDelta:
        seq = request.seq
        seq.fill_pending(token)
        if request.logprobs is not None:
            n = seq.params.logprobs
            top = dict(zip(output.top_token_ids[row, :n].tolist(), output.top_logprobs[row, :n].tolist()))
            rank = 0 if output.ranks is None else int(output.ranks[row])  # a runner may report no ranks
            request.logprobs.append(Logprob(token, float(output.logprobs[row]), top, rank=rank))
        # As in vLLM, a token that stops the request by id (EOS, stop_token_ids) adds no text.
        reason = self._stop_token_reason(request, token)
        if reason is None:
            request.detokenizer.add(token)
            reason = self._stop_text_or_length_reason(request)
        if reason is not None and request.text_end is None:
            request.detokenizer.flush()  # the text it releases may complete a stop string
            if self._found_stop_string(request):
                reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._take_delta(request)

    def _stop_token_reason(self, request: _Request, token: int) -> str | None:
        if token in request.stop_ids and request.seq.num_output_tokens >= request.seq.params.min_tokens:
            return "stop"
        return None

    def _stop_text_or_length_reason(self, request: _Request) -> str | None:
        if request.max_stop_len and self._found_stop_string(request):
            return "stop"
        if request.seq.num_output_tokens >= request.seq.max_tokens:
            return "length"
        return None

    def _found_stop_string(self, request: _Request) -> bool:
        """Whether the text not searched yet holds a stop string (then the text is cut there). As in vLLM,
        the text of the first min_tokens tokens ends none: it is passed over unsearched."""
        seq, params, text = request.seq, request.seq.params, request.detokenizer.text
        hits = []
        if params.stop and seq.num_output_tokens > params.min_tokens:
            # Text already streamed is never taken back, so a stop string can only start after it; and it ends
            # in the text not searched yet (what was searched held none, or was passed over under min_tokens).
            hits = [k for k in (text.find(s, max(request.emitted, request.searched - len(s) + 1))
                                for s in params.stop) if k >= 0]
        if hits:
            request.text_end = min(hits)
        request.searched = len(text)
        return bool(hits)

    def _take_delta(self, request: _Request) -> StreamDelta:
        seq, text = request.seq, request.text
        finished, known = seq.is_finished, seq.num_known_tokens
        # Hold back text that may yet turn out to start a stop string.
        end = max(len(text) - (0 if finished else max(request.max_stop_len - 1, 0)), request.emitted)
        outputs = slice(request.emitted_until - seq.num_prompt_tokens, known - seq.num_prompt_tokens)
        delta = StreamDelta(seq.seq_id, seq.seq_id, seq.token_ids[request.emitted_until : known],
                            text[request.emitted : end], finished, seq.finish_reason,
                            None if request.logprobs is None else request.logprobs[outputs])
        request.emitted, request.emitted_until = end, known
        return delta


def _is_token_id(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
