"""The engine's host time per step without a model: scheduling, building the batch, reading back,
detokenizing and the stop rules. On a GPU the device runs a step while the host does this for the
next, so when the device is fast this sets the pace.

    python benchmarks/host_step.py [--num-seqs 256] [--vocab 151936] [--rounds 3]

The mock backend's runner with its model and sampler replaced by a hash of each row's last token
(its own time, ~0.05 ms a step, is counted apart) drives the engine through `LLM.stream`, as the bench does:
100-1000 prompt and 100-500 output tokens, temperature 0.6, half the requests with stop strings.
`--vocab 151936` draws ids over a Qwen3-sized vocabulary, as a random-weight Qwen3 does in the GPU
bench (the mock tokenizer knows 1024 of them: the rest add no text); `--vocab 1024` stays inside it.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.runner import StepBatch, StepOutput


class HashModel:
    """In place of the runner's model and sampler: each row's token is a hash of its last input, its
    context length and its seed (ids in [1, vocab)); its time is kept apart."""

    def __init__(self, vocab: int):
        self.vocab, self.seconds = vocab, 0.0

    def __call__(self, batch: StepBatch) -> StepOutput:
        start = time.perf_counter()
        last = batch.input_ids[batch.logits_indices].astype(np.int64)
        tokens = (last * 7 + batch.context_lens * 13 + batch.sampling.seeds) % (self.vocab - 1) + 1
        self.seconds += time.perf_counter() - start
        return StepOutput(token_ids=tokens.astype(np.int32))


def run(llm: LLM, model: HashModel, num_seqs: int, seed: int) -> tuple[int, int, float]:
    """(steps, output tokens, host seconds) for one pass of the workload."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 1024) for _ in range(rng.randrange(100, 1001))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, max_tokens=rng.randrange(100, 501), ignore_eos=True,
                             stop=["zzqq", "\n\n\n\n"] if i % 2 else None) for i in range(num_seqs)]
    engine, steps, tokens = llm.engine, [0], 0
    step = engine.step

    def counted():
        steps[0] += 1
        return step()

    engine.step, model.seconds = counted, 0.0
    start = time.perf_counter()
    for delta in llm.stream(prompts, params):
        tokens += len(delta.token_ids)
    wall = time.perf_counter() - start
    del engine.step
    return steps[0], tokens, wall - model.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936, help="ids are drawn from [1, vocab)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(backend="mock", max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048)
    llm.engine.runner.execute = model = HashModel(args.vocab)
    for r in range(args.rounds):
        llm.reset_prefix_cache()  # every round prefills its prompts, as the first did
        steps, tokens, host = run(llm, model, args.num_seqs, seed=0)
        print(f"round {r + 1}: {steps} steps, {tokens / steps:.0f} tokens a step, host {host * 1e3 / steps:.2f} ms a step "
              f"({host * 1e6 / tokens:.1f} us a token)")


if __name__ == "__main__":
    main()
