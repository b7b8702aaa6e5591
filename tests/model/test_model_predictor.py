"""DBSAMPredictor: one encode per image, many boxes, masks at the original size."""
import numpy as np
import pytest
import torch

from dbsam.model import DBSAMPredictor
from dbsam.model.predictor import resized_shape, to_rgb_0_255


def test_resized_shape():
    assert resized_shape(300, 200, 1024) == (1024, 683)
    assert resized_shape(64, 64, 128) == (128, 128)


def test_intensity_conversion():
    grey16 = np.array([[1000, 3000], [2000, 1000]], dtype=np.uint16)
    x = to_rgb_0_255(grey16)
    assert x.shape == (3, 2, 2) and x.min() == 0 and x.max() == 255
    rgb8 = np.full((2, 2, 3), 7, dtype=np.uint8)
    assert torch.equal(to_rgb_0_255(rgb8), torch.full((3, 2, 2), 7.0))
    with pytest.raises(ValueError, match="H x W"):
        to_rgb_0_255(np.zeros((2, 2, 5), np.uint8))


@pytest.mark.parametrize("shape,dtype", [((90, 200), np.uint16), ((150, 60, 3), np.uint8), ((70, 70, 1), np.int16)])
def test_predict_many_boxes_non_square(tiny, shape, dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    image = rng.integers(max(info.min, -1000), min(info.max, 4000), size=shape).astype(dtype)
    H, W = shape[:2]
    predictor = DBSAMPredictor(tiny, max_boxes_per_call=2)  # 3 boxes: two decoder calls
    predictor.set_image(image)
    assert predictor.original_size == (H, W) and max(predictor.input_size) == tiny.config.img_size
    boxes = np.array([[0, 0, W - 1, H - 1], [W // 4, H // 4, W // 2, H // 2], [5, 5, 20, 30]], dtype=np.float32)
    masks, scores, low = predictor.predict(boxes)
    s = tiny.config.img_size // 4
    assert masks.shape == (3, H, W) and masks.dtype == torch.bool
    assert scores.shape == (3,) and low.shape == (3, s, s)
    # the same boxes one by one give the same answers
    for i in range(3):
        one = predictor.predict(boxes[i])
        torch.testing.assert_close(one.low_res_logits[0], low[i], rtol=1e-4, atol=1e-5)
        assert torch.equal(one.masks[0], masks[i])
    # and they match the model run by hand on the resized, padded image
    x = to_rgb_0_255(image)[None]
    nh, nw = predictor.input_size
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        low_ref, _ = tiny.eval()(tiny.preprocess(x.clamp(0, 255)), torch.as_tensor(boxes[:1]) * torch.tensor(
            [nw / W, nh / H, nw / W, nh / H]))
    torch.testing.assert_close(low[:1], low_ref[:, 0], rtol=1e-4, atol=1e-5)


def test_predict_requires_image(tiny):
    with pytest.raises(RuntimeError, match="set_image"):
        DBSAMPredictor(tiny).predict(np.zeros((1, 4)))


def test_predict_no_boxes(tiny):
    p = DBSAMPredictor(tiny)
    p.set_image(np.zeros((40, 50), np.uint8))
    out = p.predict(np.zeros((0, 4)))
    assert out.masks.shape == (0, 40, 50)
