"""SAM's mask decoder over a batch of images in one call.

segment_anything's `MaskDecoder.predict_masks` pairs *one* image embedding with all the prompts of
a call (it repeats the embedding once per prompt), so a batch of B images used to take B decoder
calls: ~500 ATen ops each forward and as many again backward, in a training step that is host-bound
at batch 1-2 (benchmarks/NOTES.md sections 16-17). `predict_masks` below runs the decoder's own
submodules (SAM's two-way transformer, upscaling, hypernetwork MLPs and IoU head, SAM's weights)
in the order SAM's method runs them, with the one change that image b's embedding is repeated for
its own K prompts only. With B = 1 it is SAM's computation; tests/model/test_model_decoder.py checks
it against SAM's `MaskDecoder.forward` image by image.
"""
from typing import Tuple

import torch
from segment_anything.modeling import MaskDecoder


def predict_masks(decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse_prompt_embeddings: torch.Tensor,
                  dense_prompt_embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """image_embeddings (B, C, h, w); image_pe (1, C, h, w); the prompt encoder's sparse (B*K, n, C)
    and dense (B*K, C, h, w) embeddings, image-major (prompts 0..K-1 belong to image 0).
    Returns every mask token's low-res logits (B*K, num_mask_tokens, 4h, 4w) and IoU (B*K, num_mask_tokens)."""
    n_prompts, n_images = sparse_prompt_embeddings.shape[0], image_embeddings.shape[0]
    if n_prompts % n_images:
        raise ValueError(f"predict_masks: {n_prompts} prompts do not split evenly over {n_images} images")
    per_image = n_prompts // n_images

    # The decoder's query tokens: the IoU token, the mask tokens, then each prompt's own tokens.
    learned = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
    tokens = torch.cat([learned.expand(n_prompts, -1, -1), sparse_prompt_embeddings], 1)

    # Each prompt sees its own image (SAM: the call's one image), plus its dense embedding.
    src = image_embeddings if per_image == 1 else image_embeddings.repeat_interleave(per_image, 0)
    src = src + dense_prompt_embeddings
    pos_src = image_pe.expand(n_prompts, -1, -1, -1)   # the same for every prompt: a view, not copies
    b, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens]

    # Upscale the image tokens; each mask token's hypernetwork MLP gives the weights of its mask.
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)
