"""Join merges: exact weighted averages (weights are shares), task arithmetic, field alignment by name, the PEFT
merge methods."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from modeling_gwm.model.merging import FIELD_EMBEDDING_KEY, MergeSpec, merge_adapters

KEY_EMB = "base_model.model." + FIELD_EMBEDDING_KEY
KEY_LOOP = "base_model.model.transformer_blocks.0.loop_emb"


def _state(seed: int, slots: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {KEY_LOOP: torch.randn(2, 8, generator=g), KEY_EMB: torch.randn(slots, 4, generator=g),
            "base_model.model.proj_in.weight": torch.randn(8, 4, generator=g)}


def test_linear_join_is_the_exact_weighted_average():
    init, a, b = _state(0), _state(1), _state(2)
    fields = ["x", "y"]
    merged = merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("linear"), weights=[0.7, 0.3])
    for key in init:
        torch.testing.assert_close(merged[key], 0.7 * a[key] + 0.3 * b[key], atol=1e-6, rtol=0)


def test_linear_weights_are_shares_whatever_their_sum():
    init, a, b = _state(0), _state(1), _state(2)
    fields = ["x", "y"]
    merged = merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("linear"), weights=[1, 1])
    again = merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("linear", weights=[7, 3]))
    for key in init:
        torch.testing.assert_close(merged[key], 0.5 * a[key] + 0.5 * b[key], atol=1e-6, rtol=0)  # the average
        torch.testing.assert_close(again[key], 0.7 * a[key] + 0.3 * b[key], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"linear merge weights \[1, -1\] must be non-negative"):
        merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("linear"), weights=[1, -1])


def test_task_arithmetic_adds_the_unnormalised_weighted_deltas():
    init, a, b = _state(0), _state(1), _state(2)
    merged = merge_adapters([a, b], [["x", "y"], ["z", "x"]], ["x", "y", "z"], init, MergeSpec("task_arithmetic"),
                            weights=[1.0, -0.5])
    for key in (KEY_LOOP, "base_model.model.proj_in.weight"):
        expected = init[key] + (a[key] - init[key]) - 0.5 * (b[key] - init[key])
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0)
    table, start = merged[KEY_EMB], init[KEY_EMB]
    torch.testing.assert_close(table[0], start[0] + (a[KEY_EMB][0] - start[0]) - 0.5 * (b[KEY_EMB][1] - start[0]),
                               atol=1e-5, rtol=0)  # x: in both
    torch.testing.assert_close(table[2], start[2] - 0.5 * (b[KEY_EMB][0] - start[2]), atol=1e-5, rtol=0)  # z: only b


def test_ties_with_equal_shares_is_the_papers_disjoint_mean():
    """Equal shares give PEFT's TIES with weights 1 (the paper's disjoint mean), not half of it."""
    init, a, b = _state(0), _state(1), _state(2)
    fields = ["x", "y"]
    merged = merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("ties", density=0.5))
    for key in (KEY_LOOP, "base_model.model.proj_in.weight"):
        expected = init[key] + merge_utils.ties([a[key] - init[key], b[key] - init[key]], torch.ones(2), 0.5)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=0)


def test_ties_shares_weigh_the_agreeing_parents():
    init, a, b = _state(0), _state(1), _state(2)
    init[KEY_LOOP] = torch.zeros(1, 4)
    a[KEY_LOOP] = torch.tensor([[1.0, 2.0, -3.0, 2.0]])
    b[KEY_LOOP] = torch.tensor([[3.0, -1.0, 1.0, 4.0]])
    merged = merge_adapters([a, b], [["x"], ["x"]], ["x"], init, MergeSpec("ties", weights=[3, 1], density=1.0))
    # agree: 0.75·1 + 0.25·3 = 1.5, 0.75·2 + 0.25·4 = 2.5; disagree: only the elected sign's (larger sum's) parent
    torch.testing.assert_close(merged[KEY_LOOP], torch.tensor([[1.5, 2.0, -3.0, 2.5]]), atol=1e-6, rtol=0)


def test_field_whose_only_owners_weigh_zero_is_copied_not_nan():
    init, a, b = _state(0), _state(1), _state(2)
    merged = merge_adapters([a, b], [["x"], ["x", "z"]], ["x", "z"], init, weights=[1.0, 0.0])
    torch.testing.assert_close(merged[KEY_EMB][0], a[KEY_EMB][0], atol=1e-6, rtol=0)  # x: all from a
    torch.testing.assert_close(merged[KEY_EMB][1], b[KEY_EMB][1], atol=1e-6, rtol=0)  # z: only b has it


def test_field_embeddings_merge_by_name_average_where_shared_copy_where_not():
    init, a, b = _state(0), _state(1), _state(2)
    merged = merge_adapters([a, b], [["x", "y"], ["z", "x"]], ["x", "y", "z"], init, weights=[0.5, 0.5])
    table = merged[KEY_EMB]
    torch.testing.assert_close(table[0], 0.5 * a[KEY_EMB][0] + 0.5 * b[KEY_EMB][1], atol=1e-6, rtol=0)  # x: shared
    torch.testing.assert_close(table[1], a[KEY_EMB][1], atol=1e-6, rtol=0)  # y: only in a
    torch.testing.assert_close(table[2], b[KEY_EMB][0], atol=1e-6, rtol=0)  # z: only in b


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_other_merge_methods_run_reproducibly_and_differ_from_linear(method):
    init, a, b = _state(0), _state(1), _state(2)
    fields = ["x", "y"]
    spec = MergeSpec(method, density=0.5)
    linear = merge_adapters([a, b], [fields, fields], fields, init, MergeSpec("linear"))
    first = merge_adapters([a, b], [fields, fields], fields, init, spec, seed=3)
    again = merge_adapters([a, b], [fields, fields], fields, init, spec, seed=3)
    for key in init:
        assert torch.isfinite(first[key]).all()
        torch.testing.assert_close(first[key], again[key], atol=0, rtol=0)
    assert any(not torch.allclose(first[k], linear[k]) for k in init)


def test_parents_of_another_shape_are_refused_with_the_tensor_named():
    init, a = _state(0), _state(1)
    b = {**_state(2), KEY_LOOP: torch.randn(3, 8)}
    with pytest.raises(ValueError, match=r"loop_emb has shape \(3, 8\).*different n_loops"):
        merge_adapters([a, b], [["x"], ["x"]], ["x"], init)
