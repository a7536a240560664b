"""Kernel census of the GPU forward programs, compiled for an H200 on a machine without a GPU.

XLA compiles for a described GPU without one (deviceless ahead-of-time compilation: no driver, no
device, only the CUDA plugin's compiler and ptxas). The optimized HLO then lists what one step
launches: per layer, every fusion, cuBLAS call and the Pallas kernel (compiled to PTX, so a kernel
Triton cannot build fails here), and every loop with whether its trip count is known (an unknown
one waits for the device each iteration). Launch counts can so be compared before a GPU is lent.
Without autotuning, XLA's GEMM choices may differ from a real H200's; fusion decisions do not.
From XLA's thunk dump it also prints which kernels run inside CUDA graphs (XLA's command buffers):
the target names driver 580's CUDA 13.0, since XLA keeps cuBLAS and loops out of graphs for older ones.

Needs the CUDA plugin matching this jax, in a venv of its own (a few GB; CI never installs it):

    python3 -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install "jax[cuda13]==$(.venv/bin/python -c \
        'import jax; print(jax.__version__)')" absl-py -e .
    /tmp/gpuaot/bin/python benchmarks/gpu_aot_census.py --model qwen3-0.6b --tokens 256 8192
"""
from __future__ import annotations

import os
import tempfile

DUMP = tempfile.mkdtemp(prefix="gpu_aot_census_")
os.environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="-1", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
                  XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} "
                            "--xla_dump_hlo_module_re=forward_step")

import argparse  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from collections import Counter  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from nanovllm_jax import jax_runner  # noqa: E402
from nanovllm_jax.models import gemma3, llama  # noqa: E402
from nanovllm_jax.random_models import RANDOM_CONFIGS  # noqa: E402
from nanovllm_jax.runner import MAX_BANNED_IDS  # noqa: E402
from nanovllm_jax.step_packing import SeqLayout  # noqa: E402

# The H200's device description as XLA's GPU compiler reads it (GH100: sm_90, 132 SMs).
H200 = """gpu_device_info {
  driver_version: "13.0.0" compile_time_toolkit_version: "13.0.0" threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  l2_cache_size: 52428800 clock_rate_ghz: 1.98 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 memory_bandwidth: 4800000000000 device_memory_size: 150754820096
}
platform_name: "CUDA" device_description_str: "NVIDIA H200"
runtime_version { major: 13 minor: 0 } dnn_version_info { major: 9 minor: 10 }
"""
GEMMA3_270M = dict(  # the embedded default model's config.json
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, hidden_size=640,
    intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, layer_types=["sliding_attention"] * 5 + ["full_attention"]
    + (["sliding_attention"] * 5 + ["full_attention"]) * 2,
)
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
             "opt-barrier", "after-all"}


def model_shapes(name: str, unroll: bool = False):
    """(model module, its config, params as ShapeDtypeStructs in bf16, stacked as on a GPU or per layer)."""
    if name == "gemma3-270m":
        module, cfg = gemma3, gemma3.parse_config(GEMMA3_270M)
    else:
        module, cfg = llama, llama.parse_config(RANDOM_CONFIGS[name])

    host = module.load_params(cfg, lambda hf_name, shape: np.zeros(shape, np.float32), lambda hf_name: True)

    def shape_of(path, leaf):  # as loader.to_device places them: RoPE tables stay f32
        rope = any(str(getattr(k, "key", "")).startswith("rope") for k in path)
        return jax.ShapeDtypeStruct(leaf.shape, jnp.float32 if rope else jnp.bfloat16)

    params = jax.tree_util.tree_map_with_path(shape_of, host)
    if unroll:
        stacked = params["layers"]
        params["layers"] = [{k: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for k, a in stacked.items()}
                            for _ in range(cfg.num_layers)]
    return module, cfg, params


def forward_hlo(module, cfg, params, tokens: int, seqs: int, slots: int) -> str:
    """The optimized HLO of the runner's forward program for a (tokens, seqs) bucket, as on an H200."""
    tiling = jax_runner.TILINGS["gpu"]  # 16-token blocks, tables of 256 (4096-token sequences)
    layout = jax_runner.step_layout(tiling, cfg, SeqLayout(seqs, 256, MAX_BANNED_IDS, 16), tokens, tiling.max_chunk_tokens // 16,
                                    slots)
    mesh = topologies.make_mesh(topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=H200),
                                (1,), ("x",))
    on_gpu = NamedSharding(mesh, PartitionSpec())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_gpu)

    cache = spec((cfg.num_layers, cfg.num_kv_heads, slots, cfg.head_dim), jnp.bfloat16)
    args = (jax.tree.map(lambda p: spec(p.shape, p.dtype), params), cache, cache, spec((slots,), jnp.int32),
            spec((seqs,), jnp.int32), spec((layout.size,), jnp.int32))
    step = jax.jit(partial(jax_runner._forward_step, forward=module.forward, model_config=cfg),
                   static_argnames=("layout",), donate_argnums=(1, 2, 3))
    backend = jax.default_backend
    jax.default_backend = lambda: "gpu"  # the kernel's Triton lowering, not interpret mode
    try:
        lowered = step.trace(*args, layout=layout).lower()
    finally:
        jax.default_backend = backend
    return lowered.compile(compiler_options={**jax_runner.COMPILER_OPTIONS, "xla_gpu_enable_triton_gemm": False}).as_text()


def census(hlo: str) -> list[str]:
    """Per non-fused computation (the entry, loop bodies): how many kernels of each kind it launches."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and (op := re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = .+? ([a-z][a-z0-9\-]*)\(", line)):
            current.append((op.group(1), line))
    loops = {}
    for lines in computations.values():
        for op, line in lines:
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                loops[re.search(r"body=%?([\w.\-]+)", line).group(1)] = trips.group(1) if trips else "data-dependent"
    report = []
    for name, lines in computations.items():
        if name not in loops and not re.search(r"^main", name):
            continue
        kinds = Counter()
        for op, line in lines:
            if op == "fusion":
                kinds[re.search(r'"kind":"([^"]+)"', line).group(1) if '"kind":"__' in line else "fusion"] += 1
            elif op == "custom-call":
                kinds[re.search(r'custom_call_target="([^"]+)"', line).group(1)] += 1
            elif op not in NO_KERNEL:
                kinds[op] += 1
        where = f"loop body ({loops[name]} iterations)" if name in loops else "entry"
        report.append(f"  {where}: {sum(kinds.values())} kernels: "
                      + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    return report


def graphs() -> list[str]:
    """The last compiled forward's thunks from XLA's dump, nested as they run: each CUDA graph (XLA
    command buffer) with its command count, each loop, each kernel launched on its own."""
    path, = glob.glob(os.path.join(DUMP, "*forward_step.thunk_sequence_after_thunk_passes.txt"))
    report, graph = [], None  # graph: [depth, commands] of the CUDA graph being read
    for line in open(path):
        if line.strip() in ("condition:", "body:"):
            report.append("    " + line.strip())
            continue
        thunk = re.match(r"^( *)\d+: (k\w+)", line)
        if not thunk:
            continue
        depth, kind = len(thunk.group(1)) // 4, thunk.group(2)
        if graph and depth > graph[0]:
            graph[1] += depth == graph[0] + 1
            continue
        graph = [depth, 0] if kind == "kCommandBuffer" else None
        report.append(graph if graph else "  " + "    " * depth + ("loop" if kind == "kWhile" else f"{kind} alone"))
    shutil.rmtree(DUMP, ignore_errors=True)
    os.makedirs(DUMP)
    return [r if isinstance(r, str) else "  " + "    " * r[0] + f"CUDA graph of {r[1]} commands" for r in report]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=[*sorted(RANDOM_CONFIGS), "gemma3-270m"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 8192], help="token buckets to compile")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--slots", type=int, default=1 << 18, help="KV cache slots (16 per block)")
    parser.add_argument("--unroll", action="store_true", help="layers unrolled (per-layer weights), not scanned")
    parser.add_argument("--graphs", action="store_true", help="also list the CUDA graphs (XLA command buffers)")
    parser.add_argument("--hlo-dir", help="also write each program's optimized HLO here")
    args = parser.parse_args()
    module, cfg, params = model_shapes(args.model, args.unroll)
    for tokens in args.tokens:
        hlo = forward_hlo(module, cfg, params, tokens, min(tokens, args.max_num_seqs), args.slots)
        if args.hlo_dir:
            with open(os.path.join(args.hlo_dir, f"{args.model}_{tokens}.hlo.txt"), "w") as f:
                f.write(hlo)
        print(f"{args.model}, {tokens}-token step (H200, deviceless):", *census(hlo), sep="\n", flush=True)
        if args.graphs:
            print("  thunks (CUDA graphs and kernels launched alone):", *graphs(), sep="\n", flush=True)
    shutil.rmtree(DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
