"""On-device sampling with per-row parameters (same semantics as backends/sampler.py).

Order: logprobs from the raw logits; repetition / frequency / presence penalties; banned ids;
then greedy (temperature 0) or, as vLLM's v1 sampler: temperature, min-p, top-k, then top-p over
the distribution that min-p and top-k kept, renormalized; then an inverse-CDF draw with uniforms
keyed by fold_in(PRNGKey(seed), context_len), so a row samples alike in any batch.
Three programs per bucket, picked on the host by what a step's rows ask for (`kind`): "greedy"
(argmax only), "plain" (temperature draws and greedy rows) and "full". The first two have no
control flow: on a GPU every lax.cond makes the dispatching thread wait until the device reaches it,
so a step that needs none can be queued behind the running forward. In "full" the costly parts
(penalty counts, the top-k/top-p ranking, log_softmax + top-N) sit behind lax.cond, on host-computed
step flags or on the rows' parameters. Every cond returns per-row arrays only: XLA copies a
vocabulary-sized cond result.

Kept cheap for large vocabularies on CPU (Gemma's 262k): top-k/top-p rank only the best
CANDIDATES tokens unless a row needs more (then a bisection over the row, never a sort: that
costs ~70 ms per row there), and the draw needs two uniforms per row, not a noise value per
vocabulary entry.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # SamplingParams caps logprobs at 20; the host slices the N a step asked for


class SamplingInputs(NamedTuple):
    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S]; 0 off
    top_p: jax.Array  # f32[S]; 1 off
    min_p: jax.Array  # f32[S]; 0 off
    seeds: jax.Array  # u32[S]
    repetition_penalty: jax.Array  # f32[S]
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    prompt_lens: jax.Array  # i32[S]
    context_lens: jax.Array  # i32[S]
    banned_token_ids: jax.Array  # i32[S, K]; -1 padded
    # step flags (i32 scalars, nonzero = on)
    use_penalties: jax.Array
    use_logprobs: jax.Array


class SampleOutput(NamedTuple):
    token_ids: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]
    ranks: jax.Array  # i32[S]; how many logprobs of the row are >= the sampled token's (vLLM's rank)
    top_token_ids: jax.Array  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


ContextFn = Callable[[], tuple[jax.Array, jax.Array]]  # -> (token ids i32[S, W], valid bool[S, W])


def penalized_values(logits: jax.Array, s: SamplingInputs, context: ContextFn) -> tuple[jax.Array, jax.Array]:
    """The penalized logits of each row's context tokens: (token ids [S, W], new values [S, W]).

    Only context tokens change, so these are scattered back into the logits; an id of `vocab` is
    dropped by that scatter. Repetition applies to every seen token, frequency/presence to outputs."""
    tokens, valid = context()
    rows, width = tokens.shape
    vocab = logits.shape[-1]
    is_output = valid & (jnp.arange(width)[None, :] >= s.prompt_lens[:, None])
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], tokens.shape)
    tokens = jnp.where(valid, tokens, vocab)  # invalid entries fall out of range and are dropped
    counts = jnp.zeros((rows, vocab), jnp.float32).at[row_ids, tokens].add(is_output.astype(jnp.float32), mode="drop")
    count = jnp.take_along_axis(counts, jnp.minimum(tokens, vocab - 1), axis=-1)
    value = jnp.take_along_axis(logits, jnp.minimum(tokens, vocab - 1), axis=-1)
    rep = s.repetition_penalty[:, None]
    value = jnp.where(value > 0, value / rep, value * rep)
    value = value - s.frequency_penalty[:, None] * count - s.presence_penalty[:, None] * (count > 0)
    return tokens, value


CANDIDATES = 256  # tokens ranked for top-k/top-p, unless some row's top-k or nucleus needs more


def vocab_blocks(x: jax.Array, fill=-jnp.inf) -> jax.Array:
    """[S, V] -> [S, V / width, width] with width about sqrt(V), the tail padded with `fill` (a free
    reshape when V is a multiple of the width). Sampling walks the vocabulary in these two levels:
    per-block reductions are vectorized on every backend, and the second level reads one block."""
    rows, vocab = x.shape
    width = 1 << ((vocab.bit_length() + 1) // 2)
    return jnp.pad(x, ((0, 0), (0, -vocab % width)), constant_values=fill).reshape(rows, -1, width)


def nan_max(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """The maximum over the last axis, NaN where that holds one: XLA:CPU's vectorized max skips NaN
    in long rows, and a row with a NaN has no distribution (it takes its first NaN)."""
    return jnp.where(jnp.isnan(x).any(axis=-1, keepdims=keepdims), jnp.nan, x.max(axis=-1, keepdims=keepdims))


def argmax(blocks: jax.Array, block_max: jax.Array) -> jax.Array:
    """First index of each row's maximum from its vocab_blocks and their maxima [S, blocks] (XLA:CPU's
    argmax over a 262k row is a slow scalar loop, its plain max reduces are vectorized)."""
    block = jnp.argmax(block_max, axis=-1).astype(jnp.int32)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    return block * blocks.shape[-1] + jnp.argmax(inside, axis=-1).astype(jnp.int32)


def _rank_cutoff(values: jax.Array, ids: jax.Array, weights: jax.Array, s: SamplingInputs,
                 nucleus: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The last (value, id) that top-k and top-p keep of rows ranked in descending order [S, K],
    with unnormalized `weights`; a token is in the nucleus while the weight ranked before it is
    below `nucleus` [S] (top_p times the weight min-p and top-k keep). Both keep a prefix of the
    ranking, so this pair describes the kept set."""
    rank = jnp.arange(weights.shape[-1])[None, :]
    keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    before = jnp.cumsum(weights, axis=-1) - weights  # weight strictly before the token
    keep &= (s.top_p[:, None] >= 1.0) | (before < nucleus[:, None])
    last = jnp.maximum(keep.sum(axis=-1, keepdims=True) - 1, 0)
    return jnp.take_along_axis(values, last, axis=-1)[:, 0], jnp.take_along_axis(ids, last, axis=-1)[:, 0]


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values x are."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(1 << 31))


def _nth_match(match: jax.Array, n: jax.Array) -> jax.Array:
    """The index of each row's n-th (1-based) True in match [S, V], by block counts, then in its block."""
    blocks = vocab_blocks(match.astype(jnp.int32), 0)
    through = jnp.cumsum(blocks.sum(axis=-1), axis=-1)  # matches up to and including each block
    block = jnp.sum(through < n[:, None], axis=-1).astype(jnp.int32)
    before = jnp.where(block > 0, jnp.take_along_axis(through, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0], 0)
    inside = jnp.cumsum(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0], axis=-1) + before[:, None]
    return block * blocks.shape[-1] + jnp.sum(inside < n[:, None], axis=-1).astype(jnp.int32)


def _bisect_cutoff(scaled: jax.Array, weights: jax.Array, min_p_mass: jax.Array,
                   s: SamplingInputs) -> tuple[jax.Array, jax.Array]:
    """The last (value, id) that top-k and top-p keep of whole rows [S, V] with unnormalized
    `weights`, without a sort (which costs ~70 ms per 262k row on CPU): the cutoff value by bisection
    over order-preserving integer keys (32 passes; the least key whose strictly-greater count, or
    weight, stays below top_k, or top_p times the weight that min-p and top-k keep: `min_p_mass`
    [S] where top-k is off), then how many of its ties the ranking's lower-id-first order keeps,
    and their last id."""
    keys = _order_keys(scaled)
    p, k = s.top_p, s.top_k

    def least_key(above: Callable[[jax.Array], jax.Array], limit: jax.Array) -> jax.Array:
        """Per row, the least key whose above(key) (non-increasing in key) is below limit."""
        def halve(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            ok = above(mid[:, None]) < limit
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        lo, hi = jnp.zeros_like(limit, jnp.uint32), jnp.full_like(limit, 0xFFFFFFFF, jnp.uint32)
        return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]

    def unused(_):
        return jnp.full_like(p, 0xFFFFFFFF, jnp.uint32)

    key_k = jax.lax.cond(jnp.any(k > 0), lambda _: least_key(lambda key: (keys > key).sum(axis=-1), k), unused, None)
    tie_k, above_k = keys == key_k[:, None], keys > key_k[:, None]
    # the top_k minus the tokens ranked above
    n_k = jnp.clip(k - above_k.sum(axis=-1), 1, tie_k.sum(axis=-1)).astype(jnp.int32)

    def top_k_mass(_):  # the weight of the top-k tokens that min-p keeps (ties have one weight)
        tie_weight = jnp.where(tie_k, weights, 0.0).max(axis=-1)
        above = jnp.where(above_k & (weights >= s.min_p[:, None]), weights, 0.0).sum(axis=-1)
        return jnp.where(k > 0, above + jnp.where(tie_weight >= s.min_p, n_k * tie_weight, 0.0), min_p_mass)

    # top_p of the weight that min-p and top-k keep
    nucleus = p * jax.lax.cond(jnp.any((k > 0) & (p < 1.0)), top_k_mass, lambda _: min_p_mass, None)
    key_p = jax.lax.cond(jnp.any(p < 1.0), lambda _: least_key(
        lambda key: jnp.where(keys > key, weights, 0.0).sum(axis=-1), nucleus), unused, None)
    tie_p = keys == key_p[:, None]
    weight_before = jnp.where(keys > key_p[:, None], weights, 0.0).sum(axis=-1)
    tie_weight = jnp.where(tie_p, weights, 0.0).max(axis=-1)
    # the ties whose weight before them stays below the nucleus
    n_p = jnp.clip(jnp.ceil((nucleus - weight_before) / tie_weight), 1, tie_p.sum(axis=-1)).astype(jnp.int32)
    # the cutoff that comes first in the ranking wins: the greater key, or fewer of the same ties
    p_first = (k <= 0) | ((p < 1.0) & ((key_p > key_k) | ((key_p == key_k) & (n_p <= n_k))))
    cut_id = _nth_match(jnp.where(p_first[:, None], tie_p, tie_k), jnp.where(p_first, n_p, n_k))
    return jnp.take_along_axis(scaled, cut_id[:, None], axis=-1)[:, 0], cut_id


class Cutoff(NamedTuple):
    """Which tokens of each row a filter keeps, as per-row scalars [S, 1]: a token whose scaled
    logit (logits / temperature) is `value`, with weight w = exp(value - top), is kept when
    (value > cut or (value == cut and id <= cut_id)) and w >= min_p. The cut is a scaled logit, not a
    weight: a division rounds alike in every program, but exp is vectorized differently by batch
    shape, and a cut weight one ulp off dropped the boundary token in some batches only."""

    top: jax.Array
    cut: jax.Array
    cut_id: jax.Array
    min_p: jax.Array

    @staticmethod
    def keep_all(top: jax.Array, vocab: int) -> "Cutoff":
        """No filter: every token of rows whose maxima are `top` [S, 1] is kept."""
        rows = top.shape[0]
        return Cutoff(top, jnp.full((rows, 1), -jnp.inf), jnp.full((rows, 1), vocab, jnp.int32),
                      jnp.zeros((rows, 1), jnp.float32))

    def weights(self, values: jax.Array, ids: jax.Array) -> jax.Array:
        """Unnormalized kept probabilities of `values` [S, ...] with token `ids` (0 where dropped)."""
        def row(x):  # [S, 1] -> broadcastable to values
            return x.reshape(x.shape + (1,) * (values.ndim - 2))
        w = jnp.exp(values - row(self.top))
        keep = (values > row(self.cut)) | ((values == row(self.cut)) & (ids <= row(self.cut_id)))
        return jnp.where(keep & (w >= row(self.min_p)), w, 0.0)


def filter_cutoff(logits: jax.Array, temperature: jax.Array, top: jax.Array, s: SamplingInputs,
                  candidates: int = CANDIDATES) -> Cutoff:
    """min-p, top-k and top-p over logits / temperature [S, 1], whose row maxima are `top` [S, 1], as a
    Cutoff; ties keep the lower token id. As in vLLM, min-p keeps the tokens whose probability is at
    least min_p times the top one's, top-k the first top_k of the ranking (value, then lower id),
    and top-p the tokens of what those two kept whose renormalized mass ranked before them is below
    top_p (so at least the top token). Each keeps a prefix of the ranking.

    Rows with top-k/top-p get a cutoff (the last kept value and id) from the best `candidates`
    tokens, or by bisection over the whole row when what min-p and top-k keep reaches past them
    and either its top-k exceeds them or its nucleus is not inside them. The branches return only
    the [S] cutoffs: a vocabulary-sized cond output would cost a copy every step. The conds
    get the logits, not the scaled copy: an operand of a cond is materialized, and the logits
    already are."""
    rows, vocab = logits.shape
    ranks = ((s.top_k > 0) | (s.top_p < 1.0)) & (s.temperature > 0)

    def ranked(_):
        scaled = logits / temperature
        scaled = jnp.where(scaled == 0.0, 0.0, scaled)  # -0.0 ties 0.0: one key, one rank by id
        min_p = s.min_p[:, None]

        def weights():  # w = p / p_max, so min-p keeps w >= min_p; recomputed where used, never stored
            return jnp.exp(scaled - top)

        k = min(candidates, vocab)
        # the weight min-p keeps of the whole row: the nucleus's base where top-k is off
        min_p_mass = jax.lax.cond(
            jnp.any(ranks & (s.top_k <= 0)),
            lambda _: jnp.where(weights() >= min_p, weights(), 0.0).sum(axis=-1), lambda _: s.min_p * 0.0, None)
        values, ids = jax.lax.top_k(scaled, k)
        w = jnp.exp(values - top)
        in_top_k = (s.top_k[:, None] <= 0) | (jnp.arange(k)[None, :] < s.top_k[:, None])
        kept_mass = jnp.where(in_top_k & (w >= min_p), w, 0.0).sum(axis=-1)
        # what min-p and top-k keep ends among the candidates (a tie of the last one has its weight)
        inside = ((s.top_k > 0) & (s.top_k <= k)) | (w[:, -1] < s.min_p) | (k == vocab)
        nucleus = s.top_p * jnp.where(inside, kept_mass, min_p_mass)
        covered = (inside | (s.top_k <= 0)) & ((s.top_p >= 1.0) | (kept_mass >= nucleus))

        from_candidates = _rank_cutoff(values, ids, w, s, nucleus)

        def from_whole_rows(_):  # per row, so a covered row cuts alike in any batch
            whole = _bisect_cutoff(scaled, weights(), min_p_mass, s)
            return tuple(jnp.where(covered, a, b) for a, b in zip(from_candidates, whole))

        return jax.lax.cond(jnp.any(ranks & ~covered), from_whole_rows, lambda _: from_candidates, None)

    def unranked(_):
        return jnp.full((rows,), -jnp.inf, logits.dtype), jnp.full((rows,), vocab, jnp.int32)

    cut_value, cut_id = jax.lax.cond(jnp.any(ranks), ranked, unranked, None)
    cut = jnp.where(ranks, cut_value, -jnp.inf)[:, None]
    cut_id = jnp.where(ranks, cut_id, vocab)[:, None]
    return Cutoff(top, cut, cut_id, s.min_p[:, None])


def draw(blocks: jax.Array, temperature: jax.Array, cutoff: Cutoff, uniforms: jax.Array,
         fallback: jax.Array | None = None, filtered: bool = True) -> jax.Array:
    """One token per row, with probability proportional to the kept weights of logits / temperature
    [S, 1] (given as vocab_blocks), by inverse CDF at uniforms [S, 2] in [0, 1).

    Always an id of the row: where the kept weights have no positive finite sum (every logit -inf,
    a NaN, or a temperature so extreme that every weight rounds to 0 or overflows) there is no
    distribution to draw from, and `fallback` [S] (default: the row's argmax) stands in.

    The first uniform picks a block by block mass, the second a token inside that block by its mass
    there: O(V) work with short cumulative sums. Neither the scaled logits nor the weights are
    materialized: the block sums compute them in one fused pass and the chosen block recomputes its
    own (XLA:CPU otherwise writes a vocabulary-sized copy per intermediate). `filtered` (static)
    False: the cutoff keeps every token, no lax.cond."""
    rows, num_blocks, width = blocks.shape
    ids = jnp.arange(num_blocks * width, dtype=jnp.int32).reshape(1, num_blocks, width)

    def pick(cumulative: jax.Array, u: jax.Array) -> jax.Array:
        total = cumulative[:, -1:]
        # below the total, so the count stops before any zero-mass tail
        target = jnp.minimum(u[:, None] * total, jnp.nextafter(total, 0.0))
        return jnp.sum(cumulative <= target, axis=-1).astype(jnp.int32)

    def filtered_mass(_):
        return cutoff.weights(blocks / temperature[:, :, None], ids).sum(axis=-1)

    def plain_mass(_):  # the same weights where no row filters (no cut, w >= 0 = min_p): 4x cheaper
        return jnp.exp(blocks / temperature[:, :, None] - cutoff.top[:, :, None]).sum(axis=-1)

    if filtered:
        filters = jnp.any((cutoff.cut > -jnp.inf) | (cutoff.min_p > 0))
        block_mass = jax.lax.cond(filters, filtered_mass, plain_mass, None)
    else:
        block_mass = plain_mass(None)
    block_cumulative = jnp.cumsum(block_mass, axis=-1)
    block = pick(block_cumulative, uniforms[:, 0])
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0] / temperature
    inside_ids = block[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]
    inside_cumulative = jnp.cumsum(cutoff.weights(inside, inside_ids), axis=-1)
    token = block * width + pick(inside_cumulative, uniforms[:, 1])
    # a positive finite total keeps each pick inside its row (the block's own sum is checked too:
    # it is recomputed apart from the block masses)
    totals = jnp.stack([block_cumulative[:, -1], inside_cumulative[:, -1]], axis=-1)
    drawable = jnp.all((totals > 0) & (totals < jnp.inf), axis=-1)
    if fallback is None:
        fallback = argmax(blocks, nan_max(blocks))
    return jnp.where(drawable, token, fallback)


def _uniforms(seed: jax.Array, context_len: jax.Array) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), context_len), (2,), jnp.float32)


SAMPLER_KINDS = ("greedy", "plain", "full")


def sample(logits: jax.Array, s: SamplingInputs, context: ContextFn, kind: str = "full") -> SampleOutput:
    """logits f32[S, V] -> one token per row (plus logprobs when the step asks for them).

    `kind` (static): "greedy" where no row has a temperature, "plain" where rows use temperature only
    (no filters, penalties, banned ids or logprobs), else "full". A row draws alike in each."""
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"kind must be one of {SAMPLER_KINDS}, got {kind!r}")
    raw = logits.astype(jnp.float32)
    rows, vocab = raw.shape
    logits = _adjusted(raw, s, context) if kind == "full" else raw
    blocks = vocab_blocks(logits)
    block_max = nan_max(blocks)
    greedy = argmax(blocks, block_max)
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    top = nan_max(block_max, keepdims=True) / temperature  # = max(logits / t): division is monotonic

    def sampled(_):
        uniforms = jax.vmap(_uniforms)(s.seeds, s.context_lens)
        if kind == "plain":
            tokens = draw(blocks, temperature, Cutoff.keep_all(top, vocab), uniforms, greedy, filtered=False)
        else:
            tokens = draw(blocks, temperature, filter_cutoff(logits, temperature, top, s), uniforms, greedy)
        return jnp.where(s.temperature > 0, tokens, greedy)

    if kind == "full":
        tokens = jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda _: greedy, None)
    else:
        tokens = sampled(None) if kind == "plain" else greedy

    def with_logprobs(_):
        logprobs = jax.nn.log_softmax(raw, axis=-1)
        # NaN ranks as -inf, as in the numpy sampler (lax.top_k puts NaN first, or not, by backend and row length)
        _, top_ids = jax.lax.top_k(jnp.where(jnp.isnan(logprobs), -jnp.inf, logprobs), min(MAX_LOGPROBS, vocab))
        top_lp = jnp.take_along_axis(logprobs, top_ids, axis=-1)
        token_lp = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        ranks = (logprobs >= token_lp[:, None]).sum(axis=-1, dtype=jnp.int32)
        return token_lp, ranks, top_ids.astype(jnp.int32), top_lp

    def without(_):
        n = min(MAX_LOGPROBS, vocab)
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32), jnp.zeros((rows, n), jnp.int32),
                jnp.zeros((rows, n), jnp.float32))

    if kind == "full":
        token_lp, ranks, top_ids, top_lp = jax.lax.cond(s.use_logprobs != 0, with_logprobs, without, None)
    else:
        token_lp, ranks, top_ids, top_lp = without(None)
    return SampleOutput(tokens, token_lp, ranks, top_ids, top_lp)


def _adjusted(raw: jax.Array, s: SamplingInputs, context: ContextFn) -> jax.Array:
    """The logits with penalties and banned ids scattered into a copy."""
    rows, vocab = raw.shape
    width = jax.eval_shape(context)[0].shape[1]
    row_ids = jnp.arange(rows)[:, None]
    no_ids = jnp.full((rows, width), vocab, jnp.int32)
    ids, values = jax.lax.cond(s.use_penalties != 0, lambda _: penalized_values(raw, s, context),
                               lambda _: (no_ids, jnp.zeros((rows, width), jnp.float32)), None)
    banned = jnp.where(s.banned_token_ids >= 0, s.banned_token_ids, vocab)
    return raw.at[row_ids, ids].set(values, mode="drop").at[row_ids, banned].set(-jnp.inf, mode="drop")
