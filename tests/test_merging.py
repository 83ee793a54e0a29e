"""Join merges: exact weighted averages, field alignment by name, the PEFT merge methods."""

from __future__ import annotations

import pytest
import torch

from modeling_gwm.curriculum import MergeSpec
from modeling_gwm.merging import FIELD_EMBEDDING_KEY, merge_adapters

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
