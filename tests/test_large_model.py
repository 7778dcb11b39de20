"""A model over protobuf's 2 GB limit round-trips: external data in, folded, external data out next to the
output, every tensor intact. (Writes about 4.3 GB to a temporary folder; takes ~30 s.)"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import count_bn, fold_onnx_file

from .helpers import G, assert_close, run_ort

BIG = (1 << 29) + (1 << 20)  # float32 values: 2.15 GB


@pytest.mark.slow
def test_model_over_2gb_round_trips(tmp_path):
    if os.environ.get("BNFOLD_SKIP_2GB"):
        pytest.skip("BNFOLD_SKIP_2GB is set")
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1], name="conv"), 4, name="bn")
    big = np.arange(BIG, dtype=np.float32)
    idx = g.const(np.array([0, 12345, BIG - 1], np.int64))
    picked = g.node("Gather", ["big_table", idx], name="gather")
    model = helper.make_model(
        helper.make_graph(g.nodes, "big", g.inputs,
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 6, 6]),
                           helper.make_tensor_value_info(picked, TensorProto.FLOAT, [3])],
                          initializer=g.inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    t = model.graph.initializer.add()  # added in place: protobuf cannot copy a message over 2 GB
    t.name, t.data_type = "big_table", TensorProto.FLOAT
    t.dims.append(BIG)
    t.raw_data = big.tobytes()
    del big
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    onnx.save_model(model, src_dir / "big.onnx", save_as_external_data=True, location="big.onnx.data")
    del model, t
    import gc
    gc.collect()
    report = fold_onnx_file(src_dir / "big.onnx", out_dir / "folded.onnx")
    assert report.folded == 1
    names = sorted(os.listdir(out_dir))  # the data file has a fresh name per write
    assert len(names) == 2 and names[0] == "folded.onnx" and re.fullmatch(r"folded\.onnx\.[0-9a-f]{12}\.data", names[1])
    assert (out_dir / "folded.onnx").stat().st_size < 1 << 20  # the tensors live in the data file
    folded = onnx.load(out_dir / "folded.onnx")
    assert count_bn(folded) == 0
    tensors = {t.name: t for t in folded.graph.initializer}
    back = numpy_helper.to_array(tensors["big_table"])
    assert back.shape == (BIG,) and back[12345] == 12345 and back[-1] == BIG - 1
    assert np.array_equal(back[:: 1 << 16], np.arange(0, BIG, 1 << 16, dtype=np.float32))
    del back, tensors
    # the small part computes what it did before folding
    small = G()
    sx = small.input("x", [1, 3, 6, 6])
    ref_model = onnx.load(src_dir / "big.onnx")
    ref_model.graph.output.pop()  # drop the Gather output to run the conv part
    ref_model.graph.node.pop()
    keep = {n.input[i] for n in ref_model.graph.node for i in range(len(n.input))}
    init = [t for t in ref_model.graph.initializer if t.name in keep]
    del ref_model.graph.initializer[:]
    ref_model.graph.initializer.extend(init)
    folded.graph.output.pop()
    folded.graph.node.remove(next(n for n in folded.graph.node if n.op_type == "Gather"))
    keep = {i for n in folded.graph.node for i in n.input}
    init = [t for t in folded.graph.initializer if t.name in keep]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(init)
    feeds = {sx: np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert_close(run_ort(folded, feeds)[0], run_ort(ref_model, feeds)[0])
