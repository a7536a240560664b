"""Runs the bench over several --num-seqs values and plots output tok/s per engine.

    python benchmarks/sweep.py --out benchmarks/cpu-2core --num-seqs 1 4 16 -- --backend jax,onnx --compare hf

Everything after `--` goes to `python -m nanovllm_jax.bench` unchanged. Each point is its own process,
so one engine's memory or threads never affect the next. Plotting needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_sweep(out: Path, num_seqs: list[int], bench_args: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in num_seqs:
        path = out / f"bench_n{n}.json"
        cmd = [sys.executable, "-m", "nanovllm_jax.bench", "--num-seqs", str(n), "--json", str(path), *bench_args]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        results.append(json.loads(path.read_text()))
    return results


def plot(results: list[dict], png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib: .venv/bin/pip install -e '.[plot]' (then rerun with --plot-only)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for result in results:
        for run in result["runs"]:
            series.setdefault(run["engine"], []).append((result["workload"]["num_seqs"], run["output_tok_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of sequences")
    ax.set_ylabel("output tok/s")
    name = next((r["model_name"] for r in results if "model_name" in r), Path(results[0]["model"]).name)
    ax.set_title(f"{name} on {results[0]['machine']['cpus']} CPU cores")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON results and the PNG")
    p.add_argument("--num-seqs", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--plot-only", action="store_true", help="re-plot the JSON files already in --out")
    args = p.parse_args(own)
    if args.plot_only:
        results = [json.loads(path.read_text()) for path in sorted(args.out.glob("bench_n*.json"))]
    else:
        results = run_sweep(args.out, args.num_seqs, bench_args)
    plot(results, args.out / "tok_s_vs_num_seqs.png")
    print(f"wrote {args.out / 'tok_s_vs_num_seqs.png'}")


if __name__ == "__main__":
    main()
