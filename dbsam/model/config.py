"""DBSAMConfig: every size and option of a DB-SAM model, and the named variants.

A config is plain data (ints, floats, strings, tuples) so that it travels inside a checkpoint that
`torch.load(weights_only=True)` can read. Defaults are those of docs/model.md at SAM ViT-B.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

CONV_PYRAMIDS = ("single", "pyramid", "multiscale")
ADAPTER_PLACEMENTS = ("stage", "block")
VIT_ATTENTIONS = ("sdpa", "sam")


@dataclass(frozen=True)
class DBSAMConfig:
    # --- SAM image encoder (ViT): frozen except its neck ---------------------------------------
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    vit_attention: str = "sdpa"         # "sdpa": SAM's attention through a fused kernel, scores never
    #                                     stored (model/vit_attention.py); "sam": segment_anything's own
    # --- SAM prompt encoder (frozen) and mask decoder (trainable) ------------------------------
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3  # SAM's decoder has 3+1 mask tokens; DB-SAM uses token 0 only
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    # --- ViT branch: stages and channel-attention adapters (Eq. 1) ------------------------------
    num_stages: int = 4                 # ViT blocks split evenly: depth / num_stages blocks a stage
    adapter_placement: str = "stage"    # "stage": one adapter after each stage; "block": after every block
    adapter_se_ratio: float = 0.25
    adapter_drop_path: float = 0.3
    # --- Convolution branch -------------------------------------------------------------------
    conv_pyramid: str = "single"        # "single" | "pyramid" (4 levels, all on the token grid) |
    #                                     "multiscale" (4 levels at 2x, 1x, 1/2x, 1/4x the token grid)
    conv_input_size: int = 0            # single level: input resized to this (0: img_size // 4)
    conv_widths: Tuple[int, int] = (256, 512)
    # --- Bilateral cross-attention (MSDeformAttn) ---------------------------------------------
    cross_attn_heads: int = 0           # 0: embed_dim // 64 (head dim 64)
    cross_attn_points: int = 4
    cross_attn_ffn_ratio: float = 4.0
    cross_attn_dropout: float = 0.1
    cross_attn_drop_path: float = 0.4
    # --- ViT-Conv fusion (Eq. 2) ----------------------------------------------------------------
    fusion_reduction: int = 12
    fusion_pool: bool = True            # channel attention on globally pooled features (per-channel gate)
    fusion_mlp_ratio: float = 4.0
    fusion_drop_path: float = 0.1       # not given by the paper
    # --- Training ---------------------------------------------------------------------------------
    grad_checkpointing: bool = False    # recompute the frozen ViT blocks in backward

    def __post_init__(self):
        if self.conv_pyramid not in CONV_PYRAMIDS:
            raise ValueError(f"conv_pyramid must be one of {CONV_PYRAMIDS}, got {self.conv_pyramid!r}")
        if self.vit_attention not in VIT_ATTENTIONS:
            raise ValueError(f"vit_attention must be one of {VIT_ATTENTIONS}, got {self.vit_attention!r}")
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"adapter_placement must be one of {ADAPTER_PLACEMENTS}, got {self.adapter_placement!r}")
        if self.depth % self.num_stages:
            raise ValueError(f"depth {self.depth} must split evenly into num_stages {self.num_stages}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by cross_attn_heads {self.heads}")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Tokens per side of the ViT (64 at 1024 / 16)."""
        return self.img_size // self.patch_size

    @property
    def heads(self) -> int:
        return self.cross_attn_heads or max(1, self.embed_dim // 64)

    @property
    def blocks_per_stage(self) -> int:
        return self.depth // self.num_stages

    @property
    def conv_levels(self) -> int:
        return 1 if self.conv_pyramid == "single" else 4

    # Plain data in and out -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DBSAMConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown DB-SAM config keys {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def replace(self, **changes) -> "DBSAMConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown DB-SAM option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


VARIANTS: Dict[str, DBSAMConfig] = {
    "vit_b": DBSAMConfig(),
    "vit_l": DBSAMConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": DBSAMConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Small and random-initialised, for CPU tests and demos: 128 px, 8x8 tokens, 1 block a stage.
    "tiny": DBSAMConfig(img_size=128, embed_dim=64, depth=4, num_heads=4, window_size=4, global_attn_indexes=(1, 3),
                        prompt_embed_dim=32, mask_in_chans=4, decoder_mlp_dim=64, decoder_num_heads=4,
                        iou_head_hidden_dim=32, conv_widths=(16, 32), cross_attn_heads=4),
}

# The SAM checkpoint Meta publishes for each variant (segment-anything repository, "Model Checkpoints").
SAM_CHECKPOINT_NAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
