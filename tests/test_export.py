"""The SPEC export keeps what the ONNX pass needs: constant Reshape targets where the export computes them.

timm's LeViT normalises its Linear layers' outputs as ``bn(linear(x).flatten(0, 1)).reshape_as(x)``. With a dynamic
batch, torch's exporter builds the flatten's target shape at run time (``Concat(batch * N, C)``), so the fold pass
cannot see that the features stay the last axis (``unknown_rank``). The export gives such a Reshape the constant
target its own output type states (one symbolic dimension as -1): every BN then folds, on the SPEC path and on the
exported file alike, and the model still takes any batch size.

Numbers: ONNX Runtime (optimizations off) against a float64 run of the module, tests/helpers.py's tolerance."""

from __future__ import annotations

import copy

import onnx
import torch
from torch import nn

from bnfold import count_bn, fold_model
from bnfold.export import constant_reshape_targets, export_onnx
from bnfold.fold import fold_torch
from bnfold.models import zoo

from .helpers import assert_close, run_ort


class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm: Linear, then BatchNorm1d over its features with the tokens flattened."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LevitMlp(nn.Module):
    """A LeViT-style residual MLP over (batch, tokens, channels): LinearNorm -> Hardswish -> LinearNorm."""

    def __init__(self, c=8, hidden=16):
        super().__init__()
        self.ln1 = LinearNorm(c, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, c)

    def forward(self, x):
        return x + self.ln2(self.act(self.ln1(x)))


def _levit():
    torch.manual_seed(0)
    return zoo.randomize_bn(nn.Sequential(LevitMlp(), LevitMlp())).eval()


def test_levit_style_spec_folds_every_batchnorm(tmp_path):
    model = _levit()
    x = torch.randn(2, 5, 8)
    res, report = fold_torch(model, (x,), tmp_path / "f.onnx")
    assert (report.folded, report.bn_total) == (4, 4), report.to_dict()
    assert report.extra["onnx_pass"]["folded"] == report.extra["onnx_pass"]["bn_total"]
    out = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert count_bn(out) == 0
    for batch in (2, 5):  # the batch stays dynamic
        xb = torch.randn(batch, 5, 8)
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(xb.double()).numpy()
        assert_close(run_ort(out, {out.graph.input[0].name: xb.numpy()})[0], ref)


def test_levit_style_exported_file_folds_every_batchnorm():
    """`bnfold export --no-fold` then `bnfold fold` of the file: the same 4 of 4."""
    model = _levit()
    x = torch.randn(2, 5, 8)
    exported = export_onnx(model, (x,), keep_bn=True)
    assert count_bn(exported) == 4
    folded, report = fold_model(exported)
    assert (report.folded, report.bn_total) == (4, 4), report.to_dict()
    onnx.checker.check_model(folded, full_check=True)
    xb = torch.randn(3, 5, 8)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(xb.double()).numpy()
    assert_close(run_ort(folded, {folded.graph.input[0].name: xb.numpy()})[0], ref)
    assert_close(run_ort(exported, {exported.graph.input[0].name: xb.numpy()})[0], ref)


def test_reshape_target_is_made_constant_only_where_the_type_says_it_exactly():
    """The raw dynamo export computes the flatten targets; the rewrite makes them constants (one -1 for the
    dynamic batch) and removes the shape arithmetic; a Reshape whose output has two unknown dimensions keeps its
    computed target."""
    model = _levit()
    raw = export_onnx(model, (torch.randn(2, 5, 8),), materialize=False)
    rewritten, n = constant_reshape_targets(raw)
    assert n > 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    reshapes = [nd for nd in rewritten.graph.node if nd.op_type == "Reshape"]
    targets = [inits[nd.input[1]].tolist() for nd in reshapes if nd.input[1] in inits]
    assert [-1, 16] in targets and [-1, 8] in targets
    assert all(t.count(-1) <= 1 and 0 not in t for t in targets)
    assert len(rewritten.graph.node) < len(raw.graph.node)  # the shape arithmetic left unused is gone
    # two dynamic dimensions: the target stays computed
    proto = raw
    for vi in proto.graph.value_info:
        if vi.name == reshapes[0].output[0]:
            for d in vi.type.tensor_type.shape.dim:
                d.ClearField("dim_value")
                d.dim_param = "unknown"
    untouched, n2 = constant_reshape_targets(proto)
    assert n2 == n - 1
    xb = torch.randn(4, 5, 8)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(xb.double()).numpy()
    for m in (rewritten, untouched):
        onnx.checker.check_model(m, full_check=True)
        assert_close(run_ort(m, {m.graph.input[0].name: xb.numpy()})[0], ref)
