"""Fixtures of the model tests: the tiny DB-SAM (CPU, seconds) and inputs for it."""
import pytest
import torch

pytest.importorskip("segment_anything")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    from dbsam.model import build_dbsam

    torch.manual_seed(0)
    return build_dbsam("tiny")


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 128, generator=g)
    boxes = torch.tensor([[10.0, 20.0, 80.0, 100.0], [0.0, 0.0, 127.0, 127.0]])
    return images, boxes
