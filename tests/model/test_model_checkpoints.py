"""SAM checkpoints load strictly under SAM's names; DB-SAM checkpoints round-trip; unsafe,
truncated and foreign files are refused with a reason."""
import pathlib
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from dbsam.model import CheckpointError, build_dbsam, dbsam_model_registry, load_dbsam, save_dbsam
from dbsam.model.config import VARIANTS


def small_sam() -> Sam:
    """A SAM built with segment_anything's own classes at the tiny config's sizes (as build_sam does)."""
    cfg = VARIANTS["tiny"]
    grid = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.num_heads,
                                      patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=cfg.global_attn_indexes, window_size=cfg.window_size,
                                      out_chans=cfg.prompt_embed_dim),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.prompt_embed_dim,
                                                               mlp_dim=cfg.decoder_mlp_dim,
                                                               num_heads=cfg.decoder_num_heads),
                                 transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3,
                                 iou_head_hidden_dim=cfg.iou_head_hidden_dim),
    )


@pytest.fixture
def sam_file(tmp_path):
    torch.manual_seed(123)
    sam = small_sam()
    with torch.no_grad():  # SAM zero-initialises rel-pos tables: give every tensor a distinct value
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def assert_sam_parts_equal(model, state):
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_small_sam_loads_strictly_under_sams_names(sam_file):
    path, state = sam_file
    model = dbsam_model_registry["tiny"](checkpoint=path)
    assert set(model.sam_state_dict()) == set(state)
    assert_sam_parts_equal(model, state)


def test_sam_vit_b_loads_strictly(tmp_path):
    """segment_anything's own ViT-B (random weights) -> file -> DB-SAM ViT-B, every tensor equal."""
    from segment_anything import sam_model_registry

    state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    model = dbsam_model_registry["vit_b"](checkpoint=path)
    assert set(model.sam_state_dict()) == set(state)
    assert_sam_parts_equal(model, state)


def test_missing_sam_checkpoint_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth.*Meta.*segment-anything"):
        dbsam_model_registry["vit_b"](checkpoint=tmp_path / "nowhere.pth", device="meta")


def test_wrong_variant_is_named(sam_file):
    path, _ = sam_file
    with pytest.raises(CheckpointError, match="embed dim 64.*768"):
        build_dbsam("vit_b", checkpoint=path, device="meta")


def test_extra_or_missing_keys_are_refused(sam_file, tmp_path):
    path, state = sam_file
    extra = dict(state, **{"image_encoder.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected"):
        build_dbsam("tiny", checkpoint=tmp_path / "extra.pth")
    fewer = {k: v for k, v in state.items() if not k.startswith("mask_decoder.")}
    torch.save(fewer, tmp_path / "fewer.pth")
    with pytest.raises(CheckpointError, match="missing"):
        build_dbsam("tiny", checkpoint=tmp_path / "fewer.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would call Path.touch(marker)
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        build_dbsam("tiny", checkpoint=path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dbsam(path)
    assert not marker.exists()


def test_truncated_and_foreign_files(sam_file, tmp_path):
    path, _ = sam_file
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        build_dbsam("tiny", checkpoint=tmp_path / "cut.pth")
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        build_dbsam("tiny", checkpoint=tmp_path / "notes.pth")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not a SAM checkpoint: no image_encoder\.\* keys"):
        build_dbsam("tiny", checkpoint=tmp_path / "other.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_dbsam("tiny", checkpoint=tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a DB-SAM checkpoint"):
        load_dbsam(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is a SAM checkpoint"):
        load_dbsam(path)


def one_step(model, images, boxes):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    low, iou = model(images, boxes)
    (low.sigmoid().mean() + iou.mean()).backward()
    opt.step()


def test_dbsam_checkpoint_round_trip(sam_file, tmp_path, tiny_batch):
    sam_path, _ = sam_file
    images, boxes = tiny_batch
    model = build_dbsam("tiny", checkpoint=sam_path, fusion_pool=False)
    one_step(model.train(), images, boxes)  # trainable weights and BatchNorm statistics move
    ckpt = tmp_path / "dbsam.pt"
    save_dbsam(model, ckpt, sam_checkpoint=sam_path, extra={"epoch": 3})

    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == "dbsam" and raw["version"] == 1 and raw["extra"] == {"epoch": 3}
    assert raw["sam_checkpoint"] == "sam_tiny.pth" and raw["config"]["fusion_pool"] is False
    assert not any(k.startswith(("image_encoder.blocks.", "prompt_encoder.")) for k in raw["state_dict"])
    assert any(k.endswith("running_mean") for k in raw["state_dict"])

    back = load_dbsam(ckpt, sam_checkpoint=sam_path)
    assert back.config == model.config
    own = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, own[k]), k
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(images, boxes), model(images, boxes), rtol=0, atol=0)

    # through the registry: the config must agree
    again = dbsam_model_registry["tiny"](checkpoint=sam_path, dbsam_checkpoint=ckpt, fusion_pool=False)
    assert torch.equal(again.fusion.mlp[0].weight, model.fusion.mlp[0].weight)
    with pytest.raises(CheckpointError, match="another config.*fusion_pool"):
        dbsam_model_registry["tiny"](checkpoint=sam_path, dbsam_checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="DB-SAM checkpoint, not a SAM one"):
        dbsam_model_registry["tiny"](checkpoint=ckpt)


def test_dbsam_checkpoint_warns_without_or_with_other_sam(sam_file, tmp_path, tiny):
    sam_path, _ = sam_file
    ckpt = tmp_path / "dbsam.pt"
    save_dbsam(tiny, ckpt)
    with pytest.warns(UserWarning, match="frozen SAM parts are random"):
        load_dbsam(ckpt)
    with pytest.warns(UserWarning, match="other frozen SAM weights"):
        load_dbsam(ckpt, sam_checkpoint=sam_path)
