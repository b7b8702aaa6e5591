"""The activation-memory counters of the benchmarks and tests must not keep what they count alive.

A saved_tensors_hooks pack hook that returns the tensor itself makes every output saved for
backward (sigmoid's, softmax's, our ops' statistics) hold its own grad_fn: a cycle through C++ that
no garbage collection frees. H100 run 5's model benchmark lost each measured forward that way
(benchmarks/NOTES.md section 12)."""
import gc
import weakref

import torch
from _paths import import_from


def _outputs_freed(count):
    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    box = {}

    def run():
        box["y"] = torch.sigmoid(x * 2)  # sigmoid saves its output for backward
        return box["y"]

    nbytes = count(run, x)
    ref = weakref.ref(box.pop("y"))
    gc.collect()
    return nbytes, ref() is None


def test_benchmark_saved_bytes_counts_and_frees():
    saved_bytes = import_from("benchmarks", "saved_activations").saved_bytes
    nbytes, freed = _outputs_freed(lambda run, x: saved_bytes(run, exclude=[x])[0])
    assert nbytes == 64 * 64 * 8  # sigmoid's output (x * 2 saves nothing; x is excluded)
    assert freed, "saved_bytes kept the forward's saved output alive"


def test_test_helper_saved_activation_bytes_frees():
    helper = import_from("tests/ops", "_ca_common").saved_activation_bytes
    nbytes, freed = _outputs_freed(lambda run, x: helper(run, x, []))
    assert nbytes > 0
    assert freed, "saved_activation_bytes kept the forward's saved output alive"


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_model_saved_bytes_leaves_nothing_behind():
    import pytest

    pytest.importorskip("segment_anything", reason="the model needs segment-anything (the `model` extra)")
    from dbsam.model import build_dbsam

    model_saved_bytes = import_from("benchmarks", "saved_activations").model_saved_bytes
    torch.manual_seed(0)
    model = build_dbsam("tiny")
    S = model.config.img_size
    images = torch.randn(1, 3, S, S)
    boxes = torch.tensor([[S * 0.1, S * 0.2, S * 0.6, S * 0.7]])
    configs = (("auto", "sdpa"), ("reference", "sam"))
    for backend, attention in configs:  # what a first call keeps on purpose (the ViT's rel-pos tables)
        model_saved_bytes(model, images, boxes, backend, attention, torch.float32)
    before = _live_tensors()
    for backend, attention in configs:
        assert model_saved_bytes(model, images, boxes, backend, attention, torch.float32) > 0
    assert _live_tensors() == before  # the identity pack hook left hundreds per call
