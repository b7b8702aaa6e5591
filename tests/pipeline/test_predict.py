"""predict: box parsing and files, masks in the input's geometry, overlays, bad boxes."""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("segment_anything")

from dbsam import predict as pr  # noqa: E402


def test_box_text_and_files(tmp_path):
    assert pr.parse_box("1, 2,3,4") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="expected 4 numbers"):
        pr.parse_box("1,2,3")
    with pytest.raises(ValueError, match="comma-separated"):
        pr.parse_box("a,b,c,d")
    (tmp_path / "b.json").write_text(json.dumps({"x.png": [[1, 2, 3, 4], [5, 6, 7, 8]], "y.png": [0, 0, 9, 9]}))
    assert pr.read_boxes_file(tmp_path / "b.json") == {"x.png": [[1, 2, 3, 4], [5, 6, 7, 8]], "y.png": [[0, 0, 9, 9]]}
    (tmp_path / "b.csv").write_text("image,x0,y0,z0,x1,y1,z1\nv.nii.gz,1,2,3,4,5,6\n")
    assert pr.read_boxes_file(tmp_path / "b.csv", dims=6) == {"v.nii.gz": [[1, 2, 3, 4, 5, 6]]}
    (tmp_path / "bad.csv").write_text("x0,y0\n1,2\n")
    with pytest.raises(ValueError, match="line 2"):
        pr.read_boxes_file(tmp_path / "bad.csv")


def test_boxes_partly_outside_are_clipped_wholly_outside_refused():
    notes = []
    assert pr.checked_box([-5, 2, 10, 50], 20, 30, "img", notes.append) == (0, 2, 10, 19)
    assert "clipped" in notes[0]
    with pytest.raises(ValueError, match="entirely outside"):
        pr.checked_box([40, 2, 50, 10], 20, 30, "img")
    with pytest.raises(ValueError, match="inverted"):
        pr.checked_box([10, 2, 5, 10], 20, 30, "img")


def test_label_map_and_overlay(tmp_path):
    masks = np.zeros((2, 10, 12), bool)
    masks[0, :5], masks[1, 3:8] = True, True
    assert pr.label_map(masks[:1]).dtype == bool
    lm = pr.label_map(masks)
    assert lm[0, 0] == 1 and lm[4, 0] == 2 and lm[9, 0] == 0  # later boxes over earlier ones
    path = pr.overlay(np.full((10, 12, 3), 100.0), masks, [(0, 0, 5, 5)], tmp_path / "o.png")
    im = np.asarray(Image.open(path))
    assert im.shape == (10, 12, 3) and (im[0, 0] != 100).any()
