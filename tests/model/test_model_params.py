"""Parameter counts at ViT-B, computed from the spec (docs/model.md), and what is frozen."""
import pytest
import torch

from dbsam.model import build_dbsam
from dbsam.model.dbsam import PARTS

C, C4 = 768, 4 * 768


def linear(i, o, bias=True):
    return i * o + (o if bias else 0)


CHANNEL_ATTENTION = 2 * C + 9 * C + 2 * C * (C // 4) + C * C                 # LN, DW3x3, SE fc1+fc2, PW1x1
CONV_BRANCH = (27 * 256 + 2 * 256) + (256 * 256 + 2 * 256) + (9 * 256 * 512 + 2 * 512) + (512 * 512 + 2 * 512) + 512 * C
MS_DEFORM_ATTN = lambda levels, heads=12, points=4: (linear(C, heads * levels * points * 2) + linear(C, heads * levels * points)
                                                     + 2 * linear(C, C))
CROSS_BLOCK = lambda levels: 3 * 2 * C + MS_DEFORM_ATTN(levels) + linear(C, C4) + linear(C4, C)
FUSION = 2 * (linear(C, C // 12) + linear(C // 12, C)) + 2 * C + linear(C, C4) + linear(C4, C)
NECK = C * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256


@pytest.fixture(scope="module")
def vit_b():
    return build_dbsam("vit_b", device="meta")


def test_spec_numbers():
    assert CHANNEL_ATTENTION == 893_184
    assert CONV_BRANCH == 1_910_528


def test_vit_b_counts_per_part(vit_b):
    counts = vit_b.parameter_counts()
    expected_trainable = {
        "channel_attention": 4 * CHANNEL_ATTENTION,
        "conv_branch": CONV_BRANCH,
        "cross_attention": 4 * (CROSS_BLOCK(1) + CROSS_BLOCK(1)),
        "merge": 0,
        "fusion": FUSION,
        "norm": 2 * C,
        "neck": NECK,
    }
    for part, n in expected_trainable.items():
        assert counts[part] == {"total": n, "trainable": n}, part
    for part in ("patch_embed", "pos_embed", "vit_blocks", "prompt_encoder"):
        assert counts[part]["trainable"] == 0 and counts[part]["total"] > 0, part
    assert counts["pos_embed"]["total"] == 64 * 64 * C
    assert counts["mask_decoder"]["trainable"] == counts["mask_decoder"]["total"] == 4_058_340  # SAM ViT-B's
    assert counts["total"]["trainable"] == 63_404_516  # "about 60M" (docs/model.md)
    assert counts["total"]["total"] == 152_294_192


def test_freezing_flags(vit_b):
    for name, p in vit_b.named_parameters():
        frozen = name.startswith(("image_encoder.patch_embed.", "image_encoder.pos_embed", "image_encoder.blocks.",
                                  "prompt_encoder."))
        assert p.requires_grad == (not frozen), name


def test_options_counts():
    m = build_dbsam("vit_b", device="meta", adapter_placement="block", conv_pyramid="pyramid")
    counts = m.parameter_counts()
    assert counts["channel_attention"]["total"] == 12 * CHANNEL_ATTENTION
    assert counts["conv_branch"]["total"] == 4 * CONV_BRANCH + 4 * C  # + level embedding
    assert counts["merge"]["total"] == linear(4 * C, C)
    assert counts["cross_attention"]["total"] == 4 * (CROSS_BLOCK(4) + CROSS_BLOCK(1))


@pytest.mark.parametrize("variant,dim", [("vit_l", 1024), ("vit_h", 1280)])
def test_large_variants_build(variant, dim):
    m = build_dbsam(variant, device="meta")
    assert m.image_encoder.pos_embed.shape == (1, 64, 64, dim)
    assert m.cross_attention[0].vit_from_conv.attn.n_heads == dim // 64


def test_parts_cover_every_parameter(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert sum(any(n.startswith(prefix) for _, prefix, _ in PARTS) for n in names) == len(names)
    table = tiny.parameter_table()
    assert "| **total** |" in table and "channel_attention" in table
