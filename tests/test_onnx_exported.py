"""Real networks exported by torch.onnx (dynamo, optimize=False, so BatchNormalization survives) fold to zero BN
(or to exactly the BNs their architecture makes unfoldable), and match the unfolded export in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from bnfold import count_bn, fold_model
from bnfold.export import export_onnx
from bnfold.models import zoo

from .helpers import assert_close, io_signature, run_ort

ARCHS = ["small_resnet", "mobilenet", "efficientnet", "densenet", "inception", "unet", "conv1d", "conv3d",
         "preact_resnet", "bn_head", "mlp_bn", "mnist_mlp"]


@pytest.mark.parametrize("name", ARCHS)
def test_exported_network_folds(name):
    entry = zoo.get(name)
    torch.manual_seed(0)
    model = zoo.randomize_bn(entry.factory()).eval()
    shape = (2,) + entry.input_shape[1:]
    x = torch.randn(shape)
    exported = export_onnx(model, (x,))
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert count_bn(exported) == n_bn
    folded, report = fold_model(exported)
    assert report.bn_total == n_bn
    assert count_bn(folded) == entry.unfoldable_bn, report.to_dict()
    assert report.folded == n_bn - entry.unfoldable_bn
    onnx.checker.check_model(folded, full_check=True)
    assert io_signature(folded) == io_signature(exported)
    feeds = {exported.graph.input[0].name: x.numpy()}
    out = run_ort(folded, feeds)[0]
    with torch.no_grad():
        ref64 = model.double()(x.double()).numpy()
    assert_close(out, ref64, what="folded (ORT, fp32) vs original (torch, fp64)")
    assert_close(out, run_ort(exported, feeds)[0], what="folded vs unfolded export (ORT)")
    # dynamic batch survives folding
    x3 = np.random.default_rng(0).standard_normal((3,) + entry.input_shape[1:]).astype(np.float32)
    assert run_ort(folded, {exported.graph.input[0].name: x3})[0].shape[0] == 3


def test_report_names_torch_layers():
    """Entries carry the torch module path the exporter recorded, so users recognise their layers."""
    model = zoo.randomize_bn(zoo.create("small_resnet")).eval()
    folded, report = fold_model(export_onnx(model, (torch.randn(1, 3, 32, 32),)))
    pairs = {e.layer: e.into_layer for e in report.entries}
    assert pairs["layers.0.0.bn1"] == "layers.0.0.conv1"
    assert pairs["layers.1.0.down.1"] == "layers.1.0.down.0"
    bn_paths = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(pairs) == bn_paths


def test_raw_export_zero_bias_is_materialized():
    """torch's dynamo exporter (optimize=False) computes a zero bias in-graph for every bias-less conv, an invalid
    (M, 2) one for Conv3d; folding handles the raw export, and export_onnx materializes it (dropping zeros)."""
    model = zoo.randomize_bn(zoo.create("conv3d")).eval()
    x = torch.randn(2, 2, 8, 16, 16)
    raw = export_onnx(model, (x,), materialize=False)
    assert any(n.op_type == "Expand" for n in raw.graph.node)
    clean = export_onnx(model, (x,))
    assert not any(n.op_type in ("Expand", "CastLike") for n in clean.graph.node)
    assert count_bn(clean) == count_bn(raw) == 2
    folded_raw, report = fold_model(raw)
    assert report.folded == 2
    feeds = {clean.graph.input[0].name: x.numpy()}
    assert_close(run_ort(folded_raw, feeds)[0], run_ort(clean, feeds)[0])
