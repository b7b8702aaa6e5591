"""Shapes through every stage of DB-SAM at the tiny config, and its options."""
import time

import pytest
import torch

from dbsam.model import build_dbsam
from dbsam.model.conv_branch import level_plan, split_stride
from dbsam.model.config import VARIANTS
from dbsam.model.cross_attention import pixel_centres
from dbsam.model.vit_branch import embed, run_block, run_neck, stage_ranges


def test_stage_ranges():
    assert [list(r) for r in stage_ranges(12, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [list(r) for r in stage_ranges(4, 4)] == [[0], [1], [2], [3]]


def test_split_stride():
    assert [split_stride(s) for s in (2, 4, 8, 16)] == [(2, 1), (2, 2), (4, 2), (4, 4)]
    with pytest.raises(ValueError):
        split_stride(3)


def test_level_plans_land_on_the_grid():
    cfg = VARIANTS["vit_b"]
    assert level_plan(cfg) == [(256, (2, 2))]
    out = lambda plan: [s // (a * b) for s, (a, b) in plan]
    assert out(level_plan(cfg.replace(conv_pyramid="pyramid"))) == [64, 64, 64, 64]
    assert out(level_plan(cfg.replace(conv_pyramid="multiscale"))) == [128, 64, 32, 16]


def test_pixel_centres():
    ref = pixel_centres([(2, 4)], torch.device("cpu"))
    assert ref.shape == (1, 8, 1, 2)
    assert torch.allclose(ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    assert torch.allclose(ref[0, 4, 0], torch.tensor([0.125, 0.75]))


def test_shapes_through_every_stage(tiny, tiny_batch):
    """Walk the data flow of docs/model.md by hand and check each tensor's shape."""
    images, boxes = tiny_batch
    m, cfg = tiny.eval(), tiny.config
    B, C, g = images.shape[0], cfg.embed_dim, cfg.grid
    with torch.no_grad():
        f_d = embed(m.image_encoder, images)
        assert f_d.shape == (B, g, g, C)
        f_s = m.conv_branch(images)
        assert [t.shape for t in f_s] == [(B, g, g, C)]
        for s, blocks in enumerate(m.stages):
            assert len(blocks) == cfg.depth // 4
            for b, adapter in m.adapters_of_stage(s):
                f_d = run_block(m.image_encoder.blocks[b], f_d, False)
                if adapter is not None:
                    f_d = adapter(f_d)
            assert f_d.shape == (B, g, g, C)
            f_d, f_s = m.cross_attention[s](f_d, f_s)
            assert f_d.shape == (B, g, g, C) and [t.shape for t in f_s] == [(B, g, g, C)]
        f = m.fusion(f_d, m.merge(f_s))
        assert f.shape == (B, g, g, C)
        emb = run_neck(m.image_encoder.neck, m.norm(f))
        assert emb.shape == (B, cfg.prompt_embed_dim, g, g)
        torch.testing.assert_close(emb, m.encode(images))
        low, iou = m.decode(emb, boxes)
        assert low.shape == (B, 1, 4 * g, 4 * g) and iou.shape == (B, 1)
        low_k, iou_k = m.decode(emb, torch.stack([boxes, boxes.flip(0)], 1))   # K = 2 boxes an image
        assert low_k.shape == (B, 2, 4 * g, 4 * g) and iou_k.shape == (B, 2)
        torch.testing.assert_close(low_k[:, 0], low[:, 0])


@pytest.mark.parametrize("options", [dict(adapter_placement="block"), dict(conv_pyramid="pyramid"),
                                     dict(conv_pyramid="multiscale"), dict(fusion_pool=False)])
def test_options_forward_backward(options, tiny_batch):
    images, boxes = tiny_batch
    m = build_dbsam("tiny", **options)
    if "conv_pyramid" in options:
        g = m.config.grid
        sizes = [tuple(t.shape[1:3]) for t in m.conv_branch(images)]
        assert sizes == ([(g, g)] * 4 if options["conv_pyramid"] == "pyramid" else
                         [(2 * g, 2 * g), (g, g), (g // 2, g // 2), (g // 4, g // 4)])
        assert m.merge.proj is not None and m.conv_branch.level_embed.abs().sum() == 0
    if options.get("adapter_placement") == "block":
        assert len(m.channel_attention) == m.config.depth
    low, iou = m(images, boxes)
    (low.mean() + iou.mean()).backward()
    assert low.shape == (2, 1, 32, 32)
    no_grad = [n for n, p in m.named_parameters()
               if p.requires_grad and p.grad is None and not n.startswith("mask_decoder.output_hypernetworks_mlps.")]
    assert no_grad == []  # every adapter parameter is reached (hypernetwork MLPs 1..3 serve multimask only)


def test_tiny_forward_backward_is_fast(tiny, tiny_batch):
    images, boxes = tiny_batch
    tiny.train()
    tiny(images, boxes)  # warm-up
    t = time.perf_counter()
    low, iou = tiny(images, boxes)
    (low.mean() + iou.mean()).backward()
    assert time.perf_counter() - t < 5.0  # "a second or two" on an idle core; slack for a shared CPU


def test_preprocess_pads_like_sam(tiny):
    img = torch.full((1, 3, 100, 128), 255.0)
    x = tiny.preprocess(img)
    assert x.shape == (1, 3, 128, 128)
    assert (x[..., 100:, :] == 0).all()
    torch.testing.assert_close(x[0, :, 0, 0], (255.0 - tiny.pixel_mean.flatten()) / tiny.pixel_std.flatten())
