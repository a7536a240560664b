"""python -m nanovllm_jax.generate: generate text from the command line (default: the embedded Gemma 3 270M)."""
from __future__ import annotations

import argparse
import sys

from nanovllm_jax import LLM, SamplingParams

PROG = "python -m nanovllm_jax.generate"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SamplingParams]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("prompts", nargs="+", help="one or more prompts, generated as one batch")
    p.add_argument("--model", help="HF model dir or .gguf file (default: the embedded Gemma 3 270M)")
    p.add_argument("--backend", default="jax", choices=["jax", "onnx", "mock"], help="default: jax")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="default: 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    args = p.parse_args(argv)
    try:
        return args, SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    seed=args.seed, max_tokens=args.max_tokens)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args(argv)
    try:
        generate(args, params)
    except (ValueError, OSError) as e:  # a model, chat template or prompt refused, a cache it cannot write: no traceback
        sys.exit(f"{PROG}: error: {e}")


def generate(args: argparse.Namespace, params: SamplingParams) -> None:
    llm = LLM(args.model, backend=args.backend)
    prompts = args.prompts
    if args.chat:
        prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    if args.stream:
        counts = [0] * len(prompts)
        for delta in llm.stream(prompts, params):
            counts[delta.index] += len(delta.token_ids)
            if len(prompts) == 1:
                print(delta.text, end="\n" if delta.finished else "", flush=True)
                continue
            if delta.text:  # interleaved: a line per piece, tagged with its prompt
                print(f"[{delta.index}] {delta.text}", flush=True)
            if delta.finished:
                print(f"[{delta.index}] [{counts[delta.index]} tokens, {delta.finish_reason}]", flush=True)
        return
    for prompt, out in zip(args.prompts, llm.generate(prompts, params)):
        print(f"### {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}]\n")


if __name__ == "__main__":
    main()
