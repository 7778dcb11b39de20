"""Shared test helpers: a tiny ONNX graph builder and the fold assertion (structure, numbers, validity).

Tolerances (documented in the README): outputs of the folded model, run in ONNX Runtime with graph
optimizations disabled, must match the original run the same way within
    fp32/fp64: |folded - ref| <= 1e-5 * max(1, max|ref|) + 1e-4 * |ref|
    fp16/bf16: |folded - ref| <= 1e-2 * max(1, max|ref|) + 1e-2 * |ref|   (reference: float64 evaluation)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnfold import count_bn, fold_model
from bnfold.onnx_fold import FoldOptions

NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.float64): TensorProto.DOUBLE}


class G:
    """Minimal ONNX graph builder for tests."""

    def __init__(self, opset: int = 17, dtype=np.float32, seed: int = 0, ir_version: int | None = None,
                 prefix: str = ""):
        self.prefix = prefix
        self.opset, self.dtype = opset, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.vinfo = [], [], [], []
        self.ir_version = ir_version
        self._n = 0

    def _name(self, p):
        self._n += 1
        return f"{self.prefix}{p}{self._n}"

    def input(self, name, shape, dtype=None):
        self.inputs.append(helper.make_tensor_value_info(name, NP2ONNX[np.dtype(dtype or self.dtype)], shape))
        return name

    def const(self, arr, name=None):
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def rand(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def node(self, op, inputs, n_out=1, name=None, **attrs):
        name = name or self._name(op.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def bn_params(self, c):
        r = self.rng
        return [r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c), r.uniform(0.3, 2.0, c)]

    def bn(self, x, c, name=None, params=None, **attrs):
        p = params or self.bn_params(c)
        names = [self.const(np.asarray(v).astype(self.dtype)) for v in p]
        return self.node("BatchNormalization", [x] + names, name=name or self._name("bn"), **attrs)

    def conv(self, x, cin, cout, k=3, group=1, bias=True, name=None, transpose=False, **attrs):
        nd = attrs.pop("nd", 2)
        ks = (k,) * nd if isinstance(k, int) else tuple(k)
        wshape = (cin, cout // group) + ks if transpose else (cout, cin // group) + ks
        ins = [x, self.const(self.rand(*wshape, scale=0.3))]
        if bias:
            ins.append(self.const(self.rand(cout)))
        return self.node("ConvTranspose" if transpose else "Conv", ins, name=name, group=group, **attrs)

    def model(self, outputs, out_dtype=None, out_shapes=None):
        shapes = out_shapes or [None] * len(outputs)
        outs = [helper.make_tensor_value_info(o, NP2ONNX[np.dtype(out_dtype or self.dtype)], s)
                for o, s in zip(outputs, shapes)]
        g = helper.make_graph(self.nodes, "g", self.inputs, outs, initializer=self.inits, value_info=self.vinfo)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = self.ir_version or min(m.ir_version, 8 if self.opset <= 17 else m.ir_version)
        try:  # give the outputs their inferred types, as exporters do
            inferred = onnx.shape_inference.infer_shapes(m).graph.output
            for o, i in zip(m.graph.output, inferred):
                if i.type.tensor_type.HasField("shape"):
                    o.CopyFrom(i)
        except Exception:
            pass
        return m


def run_ort(model: onnx.ModelProto, feeds: dict, disable_all: bool = True) -> list[np.ndarray]:
    """Run in ONNX Runtime (optimizations off). ORT does not run opsets below 7: such models are converted to
    opset 14 with onnx's version converter first. (onnx's reference evaluator is not used as a reference for
    old opsets: its BatchNormalization-9 disagrees with ORT and with the definition.)"""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset < 7:
        from onnx import version_converter
        model = version_converter.convert_version(model, 14)
    so = ort.SessionOptions()
    if disable_all:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 1, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def io_signature(model: onnx.ModelProto):
    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]) for v in vis]
    inits = {t.name for t in model.graph.initializer}
    return sig([v for v in model.graph.input if v.name not in inits]), sig(model.graph.output)


def assert_close(out, ref, low_precision=False, what="output"):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    big = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    atol, rtol = ((1e-2 * big, 1e-2) if low_precision else (1e-5 * big, 1e-4))
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=what)


def assert_folds(model, *, expect_bn=0, feeds=None, options: FoldOptions | None = None, reference="ort",
                 expect_folded=None):
    """Fold ``model`` and check structure (BN count), validity (onnx.checker full + same IO, opset, IR) and
    numbers (folded vs original). Returns (folded, report)."""
    before = model.SerializeToString()
    folded, report = fold_model(model, options)
    assert model.SerializeToString() == before, "fold_model modified its input"
    assert count_bn(folded) == expect_bn, (count_bn(folded), report.to_dict())
    if expect_folded is not None:
        assert report.folded == expect_folded, report.to_dict()
    onnx.checker.check_model(folded, full_check=True)
    assert io_signature(folded) == io_signature(model)
    assert folded.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    feeds = feeds if feeds is not None else random_feeds(model)
    low = any(vi.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
              for vi in model.graph.input)
    if reference == "ort":
        ref, out = run_ort(model, feeds), run_ort(folded, feeds)
    else:
        ref, out = run_reference(model, feeds), run_reference(folded, feeds)
    for r, o in zip(ref, out):
        assert_close(o, r, low_precision=low)
    return folded, report


def strip_fold_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the fold record bnfold adds to ``metadata_props``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [p for p in m.metadata_props if p.key != "bnfold"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    return m


def assert_skip_unchanged(model, reason, *, options: FoldOptions | None = None, op="BatchNormalization",
                          feeds=None, run=True):
    """Every entry ``op`` is skipped, the first with ``reason``, and the folded model is byte for byte the input
    (apart from bnfold's metadata record); numbers are then trivially equal, but are checked when ``run``."""
    before = model.SerializeToString()
    folded, report = fold_model(model, options)
    assert model.SerializeToString() == before, "fold_model modified its input"
    entries = [e for e in report.entries if e.op == op]
    assert entries and all(e.status == "skipped" for e in entries), report.to_dict()
    assert entries[0].reason == reason, report.to_dict()
    assert strip_fold_metadata(folded).SerializeToString() == before, "a skipped fold changed the model"
    onnx.checker.check_model(folded, full_check=True)
    if run:
        feeds = feeds if feeds is not None else random_feeds(model)
        for r, o in zip(run_ort(model, feeds), run_ort(folded, feeds)):
            assert_close(o, r)
    return report


def round_bf16_reference(x: np.ndarray):
    """Independent correct rounding: of the two bf16 neighbours of each value, the nearer (exact distances in
    float64), ties to the even one."""
    import ml_dtypes
    x = np.asarray(x, np.float64).reshape(-1)
    out = np.empty(x.shape, ml_dtypes.bfloat16)
    for i, v in enumerate(x):
        bits = np.array(v, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        lo = bits.view(np.float32).astype(np.float64)
        if abs(lo) > abs(v):
            bits = bits - np.uint32(0x10000)
            lo = bits.view(np.float32).astype(np.float64)
        hi_bits = bits + np.uint32(0x10000)
        hi = hi_bits.view(np.float32).astype(np.float64)
        d_lo, d_hi = abs(v - lo), abs(hi - v)
        pick = bits if d_lo < d_hi or (d_lo == d_hi and not (int(bits) >> 16) & 1) else hi_bits
        out[i] = (np.uint32(pick) >> np.uint32(16)).astype(np.uint16).view(ml_dtypes.bfloat16)
    return out


def crash_in_child(fn, crash_at: int | None, calls: tuple[str, ...], mode: str = "exit") -> int:
    """Run ``fn`` in a forked child whose ``crash_at``-th call of the ``os`` functions named in ``calls`` crashes
    it (``exit``: os._exit, no cleanup; ``raise``: an OSError, so cleanup runs). The child gets its own temp
    folder, removed afterwards (a crashed child leaves what it had there). Returns the child's exit code
    (0 = completed)."""
    import os
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="bnfold-crash-")
    pid = os.fork()
    if pid == 0:  # child
        try:
            tempfile.tempdir = scratch
            count = [0]

            def wrap(real):
                def call(*a, **k):
                    if crash_at is not None and count[0] == crash_at:
                        if mode == "exit":
                            os._exit(77)
                        count[0] += 1
                        raise OSError(28, "injected failure")
                    count[0] += 1
                    return real(*a, **k)
                return call
            for name in calls:
                if hasattr(os, name):
                    setattr(os, name, wrap(getattr(os, name)))
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(scratch, ignore_errors=True)
    return os.waitstatus_to_exitcode(status)
