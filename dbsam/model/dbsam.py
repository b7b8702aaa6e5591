"""DB-SAM: the top-level model. `encode` reads like the data flow of docs/model.md.

    F_d = patch_embed(x) + pos_embed                         ViT branch (frozen)
    F_s = conv_branch(resize(x, 256)) (+ level_embed)        conv branch
    for each stage s:
        F_d = frozen ViT blocks of stage s (F_d)
        F_d = ChannelAttention_s(F_d)                        Eq. 1
        F_d', F_s = CrossAttn_vit_s(F_d <- F_s), CrossAttn_conv_s(F_s <- F_d)
        F_d = F_d'
    F = Fusion(F_d, merge(F_s))                              Eq. 2
    emb = SAM neck(LayerNorm(F))
    low-res logits, iou = SAM mask_decoder(emb, prompt_encoder(boxes))

SAM's parts keep SAM's names (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), so a SAM
state dict loads into them unchanged. Frozen: patch_embed, pos_embed, the ViT blocks, the prompt
encoder. Everything else trains, the SAM neck and mask decoder included.
"""
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from dbsam.ops import ChannelAttention

from .config import DBSAMConfig
from .conv_branch import ConvBranch, LevelMerge
from .cross_attention import (GEOMETRY_BUFFERS, BilateralCrossAttention, MapGeometry, geometry_buffers,
                              geometry_from_buffers)
from .decoder import predict_masks
from .fusion import ViTConvFusion
from .vit_attention import set_vit_attention
from .vit_branch import (build_image_encoder, embed, frozen_linears, norms_in_fp32, run_block, run_neck,
                         stage_ranges)

# Parts of the model, by parameter-name prefix, and whether they train (docs/model.md).
PARTS: Tuple[Tuple[str, str, bool], ...] = (
    ("patch_embed", "image_encoder.patch_embed.", False),
    ("pos_embed", "image_encoder.pos_embed", False),
    ("vit_blocks", "image_encoder.blocks.", False),
    ("channel_attention", "channel_attention.", True),
    ("conv_branch", "conv_branch.", True),
    ("cross_attention", "cross_attention.", True),
    ("merge", "merge.", True),
    ("fusion", "fusion.", True),
    ("norm", "norm.", True),
    ("neck", "image_encoder.neck.", True),
    ("prompt_encoder", "prompt_encoder.", False),
    ("mask_decoder", "mask_decoder.", True),
)
SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def part_of(name: str) -> Tuple[str, bool]:
    for part, prefix, trainable in PARTS:
        if name.startswith(prefix):
            return part, trainable
    raise KeyError(f"parameter {name!r} belongs to no DB-SAM part")


class DBSAM(nn.Module):
    mask_threshold: float = 0.0

    def __init__(self, config: DBSAMConfig = DBSAMConfig()):
        super().__init__()
        cfg = self.config = config
        C, grid = cfg.embed_dim, cfg.grid

        # SAM: image encoder (its forward is not used: see encode), prompt encoder, mask decoder.
        self.image_encoder = build_image_encoder(cfg)
        self.prompt_encoder = PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(cfg.img_size, cfg.img_size),
                                            mask_in_chans=cfg.mask_in_chans)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim)
        for sam_part in (self.image_encoder, self.prompt_encoder, self.mask_decoder):
            norms_in_fp32(sam_part)  # SAM's LayerNorm2d in fp32 under autocast; same names and weights
        self.set_vit_attention(cfg.vit_attention)
        frozen_linears(self.image_encoder.blocks)  # their autocast copies kept between steps

        # ViT branch: stages of frozen blocks, each followed by channel attention (Eq. 1).
        self.stages = stage_ranges(cfg.depth, cfg.num_stages)
        n_adapters = cfg.depth if cfg.adapter_placement == "block" else cfg.num_stages
        self.channel_attention = nn.ModuleList(
            ChannelAttention(C, se_ratio=cfg.adapter_se_ratio, drop_path=cfg.adapter_drop_path)
            for _ in range(n_adapters))

        # Convolution branch, bilateral cross-attention (two blocks a stage), merge, fusion (Eq. 2).
        self.conv_branch = ConvBranch(cfg)
        self.cross_attention = nn.ModuleList(
            BilateralCrossAttention(C, cfg.conv_levels, cfg.heads, cfg.cross_attn_points, cfg.cross_attn_ffn_ratio,
                                    cfg.cross_attn_dropout, cfg.cross_attn_drop_path)
            for _ in range(cfg.num_stages))
        self.merge = LevelMerge(C, cfg.conv_levels, grid)
        self.fusion = ViTConvFusion(C, cfg.fusion_reduction, cfg.fusion_mlp_ratio, cfg.fusion_drop_path,
                                    pool=cfg.fusion_pool)
        self.norm = nn.LayerNorm(C, eps=1e-6)  # the new LayerNorm before SAM's neck

        # Pixel-centre reference points and level layouts of the ViT map and of the conv maps: fixed by
        # the config, kept as integer buffers (see geometry_buffers).
        for which, sizes in (("vit", [(grid, grid)]), ("conv", self.conv_branch.output_sizes())):
            for name, t in geometry_buffers(sizes).items():
                self.register_buffer(f"{which}_{name}", t, persistent=False)

        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.freeze()

    # ------------------------------------------------------------------------------------------
    # Forward

    def adapters_of_stage(self, s: int) -> List[Tuple[int, Optional[nn.Module]]]:
        """(block index, adapter after it or None) for the blocks of stage s."""
        blocks = self.stages[s]
        if self.config.adapter_placement == "block":
            return [(b, self.channel_attention[b]) for b in blocks]
        return [(b, None) for b in blocks[:-1]] + [(blocks[-1], self.channel_attention[s])]

    def geometry(self, which: str) -> MapGeometry:
        """MapGeometry of the "vit" or "conv" maps, from the buffers (no host tensors)."""
        return geometry_from_buffers(*(getattr(self, f"{which}_{name}") for name in GEOMETRY_BUFFERS))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) normalised and padded -> image embedding (B, 256, S/16, S/16)."""
        vit = self.image_encoder
        f_d = embed(vit, x)                                           # (B, 64, 64, C), frozen
        f_s = self.conv_branch(x)                                     # L_s maps (B, h, w, C)
        vit_geo, conv_geo = self.geometry("vit"), self.geometry("conv")
        for s in range(len(self.stages)):
            for b, adapter in self.adapters_of_stage(s):
                f_d = run_block(vit.blocks[b], f_d, self.grad_checkpointing)
                if adapter is not None:
                    f_d = adapter(f_d)                                # channel attention, Eq. 1
            f_d, f_s = self.cross_attention[s](f_d, f_s, vit_geo, conv_geo)   # bilateral cross-attention
        f = self.fusion(f_d, self.merge(f_s))                         # ViT-Conv fusion, Eq. 2
        return run_neck(vit.neck, self.norm(f))                       # SAM neck(LayerNorm(F))

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """embeddings (B, 256, h, w); boxes (B, 4) or (B, K, 4) XYXY in the input frame (S x S).
        Returns low-res logits (B, 1 or K, 4h, 4w) and predicted IoU (B, 1 or K)."""
        boxes = boxes[:, None] if boxes.dim() == 2 else boxes
        if boxes.shape[0] != embeddings.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (B, 4) or (B, K, 4) with B = {embeddings.shape[0]}, "
                             f"got {tuple(boxes.shape)}")
        B, K = boxes.shape[:2]
        # All B*K boxes through the prompt encoder and the decoder at once (decoder.py), image-major.
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.reshape(B * K, 4), masks=None)
        masks, iou = predict_masks(self.mask_decoder, embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        # Single-mask output, as SAM's multimask_output=False: the first mask token's.
        return masks[:, 0].unflatten(0, (B, K)), iou[:, 0].unflatten(0, (B, K))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised (see preprocess); boxes (B, 4) XYXY in the S x S frame.
        Returns low-res mask logits (B, 1, S/4, S/4) and IoU predictions (B, 1)."""
        return self.decode(self.encode(images), boxes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 255], (B, 3, h, w) with max(h, w) <= S -> normalised, zero-padded to S x S (as SAM)."""
        x = (images - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return nn.functional.pad(x, (0, self.config.img_size - w, 0, self.config.img_size - h))

    # ------------------------------------------------------------------------------------------
    # Training

    def freeze(self) -> None:
        """requires_grad per docs/model.md: SAM's patch_embed, pos_embed, ViT blocks and prompt
        encoder frozen; everything else trainable."""
        for name, p in self.named_parameters():
            p.requires_grad_(part_of(name)[1])

    def set_grad_checkpointing(self, enabled: bool = True) -> "DBSAM":
        self.grad_checkpointing = bool(enabled)
        return self

    def set_vit_attention(self, impl: str = "sdpa") -> "DBSAM":
        """The frozen ViT's attention: "sdpa" (fused kernel, the score matrices never stored) or
        "sam" (segment_anything's own forward). Same parameters, same result within rounding."""
        set_vit_attention(self.image_encoder, impl)
        self.vit_attention = impl
        return self

    def trainable_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Parameters and buffers (BatchNorm statistics) of the trainable parts."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if part_of(k)[1])

    def sam_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """SAM's parts with SAM's key names, as in a sam_vit_*.pth file."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if k.startswith(SAM_PREFIXES))

    def parameter_counts(self) -> "OrderedDict[str, Dict[str, int]]":
        """{part: {"total": n, "trainable": n}} in model order, plus a "total" row."""
        counts = OrderedDict((part, {"total": 0, "trainable": 0}) for part, _, _ in PARTS)
        for name, p in self.named_parameters():
            row = counts[part_of(name)[0]]
            row["total"] += p.numel()
            row["trainable"] += p.numel() if p.requires_grad else 0
        counts["total"] = {k: sum(r[k] for r in counts.values()) for k in ("total", "trainable")}
        return counts

    def parameter_table(self) -> str:
        lines = ["| part | parameters | trainable |", "|---|---:|---:|"]
        for part, row in self.parameter_counts().items():
            bold = "**" if part == "total" else ""
            lines.append(f"| {bold}{part}{bold} | {bold}{row['total']:,}{bold} | {bold}{row['trainable']:,}{bold} |")
        return "\n".join(lines)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
