"""The batched mask decoder (dbsam/model/decoder.py) against SAM's own MaskDecoder, image by image.
In float32: SAM's prompt encoder builds its positional grid in float32 whatever the module dtype, and
the two paths differ only by the batching of the same matmuls (last-bit rounding)."""
import pytest
import torch

from dbsam.model import build_dbsam
from dbsam.model.decoder import predict_masks


def _sam_per_image(m, emb, boxes, multimask):
    """What DB-SAM's decode did before decoder.py: SAM's prompt encoder and MaskDecoder.forward,
    one call per image with all of its boxes."""
    logits, ious = [], []
    for e, b in zip(emb, boxes):
        sparse, dense = m.prompt_encoder(points=None, boxes=b, masks=None)
        low, iou = m.mask_decoder(image_embeddings=e[None], image_pe=m.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)
        logits.append(low)
        ious.append(iou)
    return torch.stack(logits), torch.stack(ious)


@pytest.mark.parametrize("B,K", [(1, 1), (3, 1), (2, 3)])
def test_batched_decoder_matches_sam_per_image(B, K):
    torch.manual_seed(0)
    m = build_dbsam("tiny")
    g = m.config.grid
    emb = torch.randn(B, m.config.prompt_embed_dim, g, g, requires_grad=True)
    lo = torch.rand(B, K, 2) * 60
    boxes = torch.cat([lo, lo + 10 + torch.rand(B, K, 2) * 60], -1)

    low, iou = m.decode(emb, boxes)
    ref_low, ref_iou = _sam_per_image(m, emb, boxes, multimask=False)
    assert low.shape == (B, K, 4 * g, 4 * g) and iou.shape == (B, K)
    torch.testing.assert_close(low, ref_low[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iou, ref_iou[:, :, 0], rtol=1e-5, atol=1e-6)
    flat = low.flatten(0, 1)
    assert low.std() > 0 and (B * K == 1 or not torch.allclose(flat[0], flat[-1]))  # prompts' logits differ

    # Gradients: the image embeddings and every trainable decoder tensor, as SAM's calls give them.
    params = [p for p in m.mask_decoder.parameters() if p.requires_grad]
    weights = torch.randn_like(low)
    ours = torch.autograd.grad((low * weights).sum() + iou.sum(), [emb] + params, allow_unused=True)
    theirs = torch.autograd.grad((ref_low[:, :, 0] * weights).sum() + ref_iou[:, :, 0].sum(), [emb] + params,
                                 allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batched_decoder_every_mask_token():
    """All mask tokens (SAM's multimask outputs included) come out as SAM computes them."""
    torch.manual_seed(1)
    m = build_dbsam("tiny").eval()
    g = m.config.grid
    emb = torch.randn(2, m.config.prompt_embed_dim, g, g)
    boxes = torch.tensor([[[5.0, 8.0, 60.0, 90.0], [30.0, 2.0, 120.0, 50.0]],
                          [[0.0, 0.0, 127.0, 127.0], [64.0, 64.0, 100.0, 110.0]]])
    sparse, dense = m.prompt_encoder(points=None, boxes=boxes.reshape(4, 4), masks=None)
    with torch.no_grad():
        masks, iou = predict_masks(m.mask_decoder, emb, m.prompt_encoder.get_dense_pe(), sparse, dense)
        ref = [m.mask_decoder.predict_masks(e[None], m.prompt_encoder.get_dense_pe(), sparse[2 * i:2 * i + 2],
                                            dense[2 * i:2 * i + 2]) for i, e in enumerate(emb)]
    torch.testing.assert_close(masks, torch.cat([r[0] for r in ref]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iou, torch.cat([r[1] for r in ref]), rtol=1e-5, atol=1e-6)
    assert masks.shape[1] == m.mask_decoder.num_mask_tokens


def test_batched_decoder_rejects_uneven_prompts():
    m = build_dbsam("tiny")
    g = m.config.grid
    emb = torch.randn(2, m.config.prompt_embed_dim, g, g)
    sparse, dense = m.prompt_encoder(points=None, boxes=torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 3), masks=None)
    with pytest.raises(ValueError, match="3 prompts do not split evenly over 2 images"):
        predict_masks(m.mask_decoder, emb, m.prompt_encoder.get_dense_pe(), sparse, dense)
