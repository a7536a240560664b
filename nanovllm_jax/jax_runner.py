"""The native JAX backend: loads an HF model, owns the paged KV cache, runs one jitted step per call.

Per step: pad the StepBatch to its (tokens, sequences) bucket and pack it into one int32 array
(one host->device transfer), run the programs compiled (and run once) for that bucket at start-up
(forward + on-device sampling; the caches are donated and updated in place) without waiting for
them, and hand back a pending output that reads the sampled tokens (and logprobs when asked).
Inputs sampled by the step before are taken from its tokens on the device, so steps queue back to
back; a step's sampler is dispatched only when the next step or the reader needs its tokens (see
_Pending). Nothing compiles after warm-up: calling an ahead-of-time compiled program with any other
shape raises instead of silently recompiling.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.buckets import bucket_for, step_buckets
from nanovllm_jax.config import EngineConfig
from nanovllm_jax.disk_cache import cache_home, writable_dir
from nanovllm_jax.hugepages import advise_huge_pages
from nanovllm_jax.layers.attention_kernel import query_tile
from nanovllm_jax.layers.sampler import SAMPLER_KINDS, SampleOutput, sample
from nanovllm_jax.loader import DTYPES, load_model
from nanovllm_jax.runner import (MAX_BANNED_IDS, SamplingBatch, StepBatch, StepOutput, allocating_kv_cache,
                                 kv_block_bytes)
from nanovllm_jax.step_packing import SeqLayout, StepLayout

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default CPU budget (capped at what max_num_seqs full-length sequences use)
# The KV cache fills most of an accelerator's memory, and once a program's use nears XLA's limit its
# rematerialization pass recomputes values to save memory. Ours hold little besides the cache (at most
# ~130 MB of temporaries), so it saves nothing, but on a GPU it copied each layer's weights out of the
# stacked arrays up to three times a step (deviceless H200 compile: 33 kernels a layer instead of 23).
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


@dataclass(frozen=True)
class Tiling:
    """How a step's attention is split into loop iterations, the smallest step bucket, and whether the
    layers run under lax.scan (stacked weights) or unrolled (per-layer weights), per platform."""

    token_block: int  # tokens that walk their cached contexts together
    new_block: int  # query block of the attention among the step's own tokens
    chunk_budget: int  # token_block * context tokens read per iteration
    max_chunk_tokens: int
    kernel: bool  # attention through the Pallas kernel
    smallest_bucket: int
    scan_layers: bool


TILINGS = {
    # XLA:CPU: blocks whose gathered chunk stays in cache (a 32-token decode ran 4x faster with
    # 16-token chunks than with 256).
    # XLA:CPU copies each layer's weights out of a stacked array under scan: unrolled there.
    "cpu": Tiling(16, 32, 512, 128, kernel=False, smallest_bucket=1, scan_layers=False),
    # Accelerators: few, wide loop iterations (each costs kernel launches); padding small steps is cheap.
    # GPU layers unrolled: one CUDA graph a step, not a host-driven loop of per-layer graphs (H200:
    # 23838 vs 21850 tok/s on nano-vllm's workload, for ~15 s more warm-up).
    "gpu": Tiling(256, 512, 1 << 17, 128, kernel=True, smallest_bucket=16, scan_layers=False),
    "tpu": Tiling(256, 512, 1 << 17, 1024, kernel=False, smallest_bucket=16, scan_layers=True),
}


def tiling_for(platform: str) -> Tiling:
    """The platform's tiling; NANOVLLM_JAX_ATTENTION=xla|pallas picks the GPU attention path and
    NANOVLLM_JAX_LAYERS=scan|unroll the layer loop (for benchmarks)."""
    tiling = TILINGS.get(platform, TILINGS["tpu"])
    attention, layers = os.environ.get("NANOVLLM_JAX_ATTENTION", ""), os.environ.get("NANOVLLM_JAX_LAYERS", "")
    if attention not in ("", "xla", "pallas"):
        raise ValueError(f"NANOVLLM_JAX_ATTENTION must be 'xla' or 'pallas', got {attention!r}")
    if attention == "pallas" and platform != "gpu":
        raise ValueError(f"NANOVLLM_JAX_ATTENTION=pallas needs a GPU (the platform is {platform})")
    if layers not in ("", "scan", "unroll"):
        raise ValueError(f"NANOVLLM_JAX_LAYERS must be 'scan' or 'unroll', got {layers!r}")
    if attention:
        tiling = replace(tiling, kernel=attention == "pallas")
    return replace(tiling, scan_layers=layers == "scan") if layers else tiling


def runner_buckets(config: EngineConfig, tiling: Tiling) -> list[tuple[int, int]]:
    """The (tokens, sequences) step buckets. A step's attention walks its tokens in blocks of
    gcd(tokens, tiling.token_block), so the budget's bucket is rounded up to a multiple of the block (or
    of the power of two below it): a 500-token bucket would walk them 4 at a time (its prefill ran 5x
    slower on CPU than a 512-token one)."""
    tokens = config.max_num_batched_tokens
    unit = min(tiling.token_block, 1 << (tokens.bit_length() - 1))
    return step_buckets(-(-tokens // unit) * unit, config.max_num_seqs, tiling.smallest_bucket)


def step_layout(tiling: Tiling, model_config, seq: SeqLayout, tokens: int, max_pages_per_chunk: int,
                num_slots: int) -> StepLayout:
    """The packed layout and attention tiling of a `tokens`-token step whose sequence section is `seq`."""
    token_block = math.gcd(tokens, tiling.token_block)
    pages = min(max_pages_per_chunk, max(1, tiling.chunk_budget // token_block // seq.block_size))
    pages = 1 << (pages.bit_length() - 1)  # a power of two, so it divides the table width
    mc = model_config
    tile = query_tile(tokens, seq.seqs, mc.num_heads // mc.num_kv_heads, mc.head_dim) if tiling.kernel else 0
    return StepLayout(tokens, seq, pages, num_slots, token_block, math.gcd(tokens, tiling.new_block), tile)


def enable_compilation_cache(cache_dir: str | None) -> str:
    """Turn on JAX's persistent compilation cache (process-wide; the first directory set wins)."""
    path = Path(cache_dir) if cache_dir else cache_home() / "xla"
    if not jax.config.jax_compilation_cache_dir:
        writable_dir(path, "compilation_cache_dir" if cache_dir else "compilation_cache_dir or XDG_CACHE_HOME")
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.config.jax_compilation_cache_dir


def _max_map_count() -> int:
    return int(Path("/proc/sys/vm/max_map_count").read_text())


def _check_map_headroom(needed: int) -> None:
    """XLA:CPU maps each compiled kernel's code and data separately (an unrolled forward program of
    an 18-layer model: ~850 mappings; the default model's 22 programs: ~10k). Past Linux's
    vm.max_map_count its JIT cannot allocate, and the error it raises crashes the process while
    unwinding; fail before compiling instead."""
    try:
        limit = _max_map_count()
        with open("/proc/self/maps") as maps:
            used = sum(1 for _ in maps)
    except (OSError, ValueError):  # not Linux
        return
    if used + needed > limit:
        raise RuntimeError(
            f"this process holds {used} memory mappings of the {limit} Linux allows (vm.max_map_count), and "
            f"compiling the next step program on CPU needs about {needed} more (XLA:CPU maps each kernel "
            "apart): release other engines first (del llm), or raise vm.max_map_count")


def _forward_step(params, k_cache, v_cache, token_cache, prev_tokens, packed, *, layout: StepLayout, forward,
                  model_config):
    """Write this step's tokens and K/V, return logits for each sequence row (and the packed
    per-sequence section, which stays on device for the sampler). Inputs sampled by the previous
    step come from its tokens, still on device."""
    inputs = layout.unpack(packed)
    fwd = inputs.forward
    input_ids = jnp.where(inputs.prev_rows >= 0, prev_tokens[jnp.maximum(inputs.prev_rows, 0)], fwd.input_ids)
    fwd = fwd._replace(input_ids=input_ids)
    token_cache = token_cache.at[fwd.slot_mapping].set(input_ids, mode="drop")
    logits, k_cache, v_cache = forward(params, k_cache, v_cache, fwd, model_config)
    return logits, inputs.seq_section, k_cache, v_cache, token_cache


def _sample_step(logits, token_cache, seq_section, *, layout: SeqLayout, kind: str, max_seqs: int):
    """The sampler's output, its tokens padded to max_seqs rows (the next step's inputs read them)."""
    inputs = layout.unpack(seq_section)

    def context():  # each row's context token ids, read through its block table (penalties only)
        bs = layout.block_size
        pos = jnp.arange(layout.table_width * bs, dtype=jnp.int32)
        slots = inputs.block_tables[:, pos // bs] * bs + pos % bs
        return token_cache[slots], pos[None, :] < inputs.sampling.context_lens[:, None]

    out = sample(logits, inputs.sampling, context, kind)
    return out._replace(token_ids=jnp.pad(out.token_ids, (0, max_seqs - layout.seqs)))


def _warm_step(block_size: int, max_blocks_per_seq: int, num_slots: int, plain: bool) -> StepBatch:
    """A one-token step that changes nothing: its K/V write goes out of range and is dropped (a
    negative slot would wrap around), and its context, whatever block 0 holds, spans a few attention
    chunks, so the context loops run. `plain`: temperature sampling only; otherwise every sampling
    feature is on (the sampler's other branches)."""
    def one(value, dtype=np.int32) -> np.ndarray:
        return np.full(1, value, dtype)

    def f32(value) -> np.ndarray:
        return one(value, np.float32)

    context = block_size * min(4, max_blocks_per_seq)  # within the block table
    sampling = SamplingBatch(
        temperature=f32(1.0), top_k=one(0 if plain else 5), top_p=f32(1.0 if plain else 0.9),
        min_p=f32(0.0 if plain else 0.01), seeds=one(0, np.uint32), repetition_penalty=f32(1.0 if plain else 1.1),
        presence_penalty=f32(0.0), frequency_penalty=f32(0.0 if plain else 0.1), prompt_lens=one(1),
        banned_token_ids=one(-1 if plain else 0).reshape(1, 1), num_logprobs=0 if plain else 1)
    return StepBatch(input_ids=one(0), prev_rows=one(-1), positions=one(context - 1), slot_mapping=one(num_slots),
                     query_start=np.array([0, 1], np.int32), context_lens=one(context),
                     block_tables=np.zeros((1, max_blocks_per_seq), np.int32), logits_indices=one(0),
                     needs_sample=np.ones(1, bool), sampling=sampling)


class _Pending:
    """A submitted step whose sampler program is dispatched only when its tokens are first needed: by
    the next step's forward (which reads them on device) or by result(). On GPU every lax.cond in
    the "full" sampler makes the dispatching thread wait until the device reaches it, so dispatching
    it right behind its forward would hold the host until that forward is done, and the host's work
    for the step before would not overlap it (the "greedy" and "plain" samplers never wait)."""

    def __init__(self, dispatch: Callable[[], SampleOutput], num_seqs: int, num_logprobs: int):
        self._dispatch: Callable[[], SampleOutput] | None = dispatch
        self._out: SampleOutput | None = None
        self.num_seqs, self.num_logprobs = num_seqs, num_logprobs

    def sampled(self) -> SampleOutput:
        """The sampler's output, on device (dispatched on the first call)."""
        if self._out is None:
            self._out, self._dispatch = self._dispatch(), None
            self._out.token_ids.copy_to_host_async()
        return self._out

    def result(self) -> StepOutput:
        s, n, out = self.num_seqs, self.num_logprobs, self.sampled()
        token_ids = np.asarray(out.token_ids)[:s]
        if n == 0:
            return StepOutput(token_ids=token_ids)
        return StepOutput(
            token_ids=token_ids,
            logprobs=np.asarray(out.logprobs)[:s],
            ranks=np.asarray(out.ranks)[:s],
            top_token_ids=np.asarray(out.top_token_ids)[:s, :n],
            top_logprobs=np.asarray(out.top_logprobs)[:s, :n],
        )


class JaxRunner:
    def __init__(self, config: EngineConfig, loaded: tuple | None = None):
        """`loaded`: an already built (model module, model config, device params), e.g. random weights
        for a benchmark; otherwise the model is read from the HF dir config.model."""
        if config.model is None and loaded is None:
            raise ValueError("the jax backend needs a model dir")
        self.compilation_cache_dir = enable_compilation_cache(config.compilation_cache_dir)
        self.platform = jax.default_backend()
        self.tiling = tiling_for(self.platform)
        self.dtype = config.dtype or ("float32" if self.platform == "cpu" else "bfloat16")
        self.model, self.model_config, self.params = loaded or load_model(config.model, self.dtype,
                                                                          self.tiling.scan_layers)
        mc = self.model_config
        config.finalize(mc.max_position_embeddings)
        self.config = config
        self.vocab_size = mc.vocab_size
        self.block_size = config.kvcache_block_size
        # XLA:CPU rewrites a whole bf16 buffer on scatter, so the CPU cache stays f32.
        self.cache_dtype = jnp.float32 if self.platform == "cpu" else DTYPES[self.dtype]
        self.num_kvcache_blocks = config.num_kvcache_blocks or self._blocks_from_budget()
        self.num_slots = self.num_kvcache_blocks * self.block_size
        cache_shape = (mc.num_layers, mc.num_kv_heads, self.num_slots, mc.head_dim)
        with allocating_kv_cache(self.num_kvcache_blocks, self.block_size, self._block_bytes(),
                                 out_of_memory=(jax.errors.JaxRuntimeError,)):
            self.k_cache = jnp.zeros(cache_shape, self.cache_dtype)
            self.v_cache = jnp.zeros(cache_shape, self.cache_dtype)
            self.token_cache = jnp.zeros((self.num_slots,), jnp.int32)
        if self.platform == "cpu":  # decode streams all weights each step: fewer TLB misses
            advise_huge_pages((self.params, self.k_cache, self.v_cache))

        self.max_pages_per_chunk = max(1, self.tiling.max_chunk_tokens // self.block_size)
        self.table_width = -(-config.max_blocks_per_seq // self.max_pages_per_chunk) * self.max_pages_per_chunk
        self.buckets = runner_buckets(config, self.tiling)
        self._token_buckets = [t for t, _ in self.buckets]
        self._seq_bucket = dict(self.buckets)
        # Two programs per step: the forward for the token bucket, then the sampler for the sequence
        # bucket (shared by token buckets, so fewer programs to compile). Logits stay on device.
        self._forward_jit = jax.jit(
            partial(_forward_step, forward=self.model.forward, model_config=mc), static_argnames=("layout",),
            donate_argnums=(1, 2, 3),
        )
        self.max_seqs = max(seqs for _, seqs in self.buckets)
        self._sample_jit = jax.jit(partial(_sample_step, max_seqs=self.max_seqs), static_argnames=("layout", "kind"))
        self._no_tokens = jnp.zeros((self.max_seqs,), jnp.int32)  # prev_tokens before any step
        self._last_step: _Pending | None = None  # its tokens are the next step's prev_rows inputs
        self._forward_programs: dict[int, tuple[StepLayout, object]] = {}
        self._sample_programs: dict[tuple[SeqLayout, str], object] = {}
        start = time.perf_counter()
        for tokens, _ in self.buckets:
            for kind in SAMPLER_KINDS:
                self._programs(tokens, kind)
        self._run_each_program_once()
        self.warmup_seconds = time.perf_counter() - start
        log.info("jax runner: %d forward + %d sampler programs compiled in %.1fs",
                 len(self._forward_programs), len(self._sample_programs), self.warmup_seconds)

    # ---- memory ---------------------------------------------------------------------------

    def _block_bytes(self) -> int:
        mc = self.model_config
        return kv_block_bytes(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.block_size,
                              jnp.dtype(self.cache_dtype).itemsize)

    def _blocks_from_budget(self) -> int:
        config = self.config
        useful = config.max_num_seqs * config.max_blocks_per_seq  # every sequence at full length
        if config.kv_cache_memory_bytes is not None:  # as in vLLM, an explicit budget wins everywhere
            budget, cap = config.kv_cache_memory_bytes, None
        elif self.platform == "cpu":
            budget, cap = CPU_KV_CACHE_BYTES, useful
        else:
            stats = jax.devices()[0].memory_stats() or {}
            limit = stats.get("bytes_limit", 0)
            mc = self.model_config
            # room for activations and logits of the largest step: its program runs the largest token bucket
            # (the budget rounded up), and a step holds no more sequences than tokens, so its logits rows
            # come from the largest sequence bucket
            tokens, rows = map(max, zip(*runner_buckets(config, self.tiling)))
            act = 4 * tokens * (3 * mc.hidden_size + 2 * mc.intermediate_size)
            act += 4 * 4 * rows * mc.vocab_size
            budget = int(limit * config.gpu_memory_utilization) - stats.get("bytes_in_use", 0) - act - (256 << 20)
            cap = None
        blocks = budget // self._block_bytes()
        if blocks < 1:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) holds no {self.block_size}-token block ({self._block_bytes()} "
                "bytes): raise kv_cache_memory_bytes or gpu_memory_utilization, or set num_kvcache_blocks")
        return int(min(blocks, cap) if cap else blocks)

    # ---- compilation ----------------------------------------------------------------------

    def _layout(self, tokens: int) -> StepLayout:
        seq = SeqLayout(self._seq_bucket[tokens], self.table_width, MAX_BANNED_IDS, self.block_size)
        return step_layout(self.tiling, self.model_config, seq, tokens, self.max_pages_per_chunk, self.num_slots)

    def _programs(self, tokens: int, kind: str):
        """(layout, forward program, sampler program of `kind`) for a bucket, compiled ahead of time once."""
        if tokens not in self._forward_programs:
            layout = self._layout(tokens)
            packed = jax.ShapeDtypeStruct((layout.size,), jnp.int32)
            try:
                lowered = self._forward_jit.lower(self.params, self.k_cache, self.v_cache, self.token_cache,
                                                  self._no_tokens, packed, layout=layout)
                self._forward_programs[tokens] = (layout, self._compile(lowered))
            except Exception as e:
                if not layout.query_tile:
                    raise
                raise RuntimeError(f"the Pallas attention kernel failed to build for {tokens}-token steps "
                                   "on this GPU; NANOVLLM_JAX_ATTENTION=xla uses the pure-JAX attention") from e
        layout, forward = self._forward_programs[tokens]
        if (layout.seq, kind) not in self._sample_programs:
            logits = jax.ShapeDtypeStruct((layout.seq.seqs, self.vocab_size), jnp.float32)
            section = jax.ShapeDtypeStruct((layout.seq.size,), jnp.int32)
            lowered = self._sample_jit.lower(logits, self.token_cache, section, layout=layout.seq, kind=kind)
            self._sample_programs[layout.seq, kind] = self._compile(lowered)
        return layout, forward, self._sample_programs[layout.seq, kind]

    def _compile(self, lowered):
        if self.platform == "cpu":  # ~850 mappings for an 18-layer forward program
            _check_map_headroom(100 * self.model_config.num_layers + 1000)
        return lowered.compile(compiler_options=COMPILER_OPTIONS)

    def _run_each_program_once(self) -> None:
        """A program's first run pays one-time costs (on XLA:CPU its kernels are linked on first use:
        ~0.2 s per program, more for loop bodies and branches first taken later), which would
        otherwise land on the first requests. Pay them here, on steps that change nothing."""
        bs, width = self.block_size, self.config.max_blocks_per_seq
        steps = [_warm_step(bs, width, self.num_slots, plain) for plain in (True, False)]
        ran, outputs = set(), []
        for layout, forward in self._forward_programs.values():
            packed = [layout.pack(step) for step in steps]
            logits, _, self.k_cache, self.v_cache, self.token_cache = forward(
                self.params, self.k_cache, self.v_cache, self.token_cache, self._no_tokens, jax.device_put(packed[0]))
            for kind in SAMPLER_KINDS:
                if (layout.seq, kind) not in ran:
                    ran.add((layout.seq, kind))
                    sampler = self._sample_programs[layout.seq, kind]
                    sections = packed if kind == "full" else packed[:1]  # "full" takes each branch of its conds
                    outputs += [sampler(logits, self.token_cache, jax.device_put(p[: layout.seq.size])) for p in sections]
        jax.block_until_ready((outputs, self.token_cache))

    # ---- the step -------------------------------------------------------------------------

    def execute(self, batch: StepBatch) -> StepOutput:
        return self.submit(batch).result()

    def submit(self, batch: StepBatch) -> _Pending:
        tokens = bucket_for(batch.num_tokens, self._token_buckets)
        sp = batch.sampling
        layout, forward, sampler = self._programs(tokens, sampler_kind(sp))
        assert batch.num_seqs <= layout.seq.seqs, (batch.num_seqs, layout)
        packed = jax.device_put(layout.pack(batch))
        prev_tokens = self._last_step.sampled().token_ids if self._last_step else self._no_tokens
        logits, section, self.k_cache, self.v_cache, self.token_cache = forward(
            self.params, self.k_cache, self.v_cache, self.token_cache, prev_tokens, packed
        )
        # dispatched before the next forward, which donates the token cache the sampler reads
        self._last_step = _Pending(partial(sampler, logits, self.token_cache, section), batch.num_seqs, sp.num_logprobs)
        return self._last_step


def sampler_kind(sampling: SamplingBatch) -> str:
    """The sampler program a step needs (layers.sampler.sample's `kind`)."""
    drawn = sampling.temperature > 0
    if (sampling.needs_penalties or sampling.num_logprobs or bool((sampling.banned_token_ids >= 0).any())
            or bool(((sampling.top_k > 0) | (sampling.top_p < 1.0) | (sampling.min_p > 0))[drawn].any())):
        return "full"
    return "plain" if drawn.any() else "greedy"
