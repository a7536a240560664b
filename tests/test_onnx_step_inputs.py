"""The runner's host-side packing: groups cover every row once and bound the query padding."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from backends.onnx.step_inputs import row_groups


@given(st.lists(st.integers(1, 512), min_size=1, max_size=40))
def test_row_groups_partition_rows_and_bound_padding(query_lens):
    batch = SimpleNamespace(query_start=np.concatenate([[0], np.cumsum(query_lens)]))
    groups = row_groups(batch)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(query_lens)))
    lens = np.asarray(query_lens)
    for g in groups:
        assert (lens[g] == 1).all() or (lens[g] > 1).all()  # decodes never pad up to a prefill chunk
        assert len(g) * lens[g].max() <= max(2 * lens[g].sum(), lens[g].max())
    assert len(groups) <= 2 + int(np.log2(max(query_lens))) + 1
