"""The whole DB-SAM model (tiny) through torch.onnx.export(dynamo=True) with our ops' translations,
run in ONNX Runtime: the exported file gives the model's own masks and scores."""
import torch

import dbsam.ops as ops

from _shared import needs_onnx


@needs_onnx
def test_tiny_model_exports_to_onnx_and_matches(tiny, tiny_batch, tmp_path):
    import onnxruntime

    model = tiny.eval()
    images, boxes = tiny_batch
    with torch.no_grad():
        want = model(images, boxes)
    program = torch.onnx.export(model, (images, boxes), dynamo=True,
                                custom_translation_table=ops.onnx_translation_table())
    path = tmp_path / "dbsam_tiny.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: images.numpy(), names[1]: boxes.numpy()})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-4, rtol=1e-4)
