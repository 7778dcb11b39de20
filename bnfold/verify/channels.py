"""The channel axes of a tensor, as the ops that produce it define them."""

from __future__ import annotations

import logging

import numpy as np
import onnx

log = logging.getLogger(__name__)

_AXIS1 = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool",
          "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample", "QLinearConv",
          "ConvInteger", "LRN", "MaxUnpool", "MaxRoiPool", "RoiAlign", "Gemm"}
_UNARY = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
          "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Clip",
          "Cast", "CastLike", "Identity", "Dropout", "Floor", "Ceil", "Round", "Sign", "Pad", "Slice", "Split",
          "LayerNormalization", "ThresholdedRelu", "Sin", "Cos", "Atan", "QuantizeLinear", "DequantizeLinear",
          "Shrink", "Not", "IsNaN", "IsInf", "CumSum", "Trilu"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "Less",
           "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "Mod", "BitShift"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _dim_key(dims):
    """(product of known sizes, sorted symbolic names) of a list of dims, or None if one is unknown."""
    prod, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            prod *= d
        elif isinstance(d, str) and d:
            syms.append(d)
        else:
            return None
    return prod, tuple(sorted(syms))


def _map_reshape(in_shape, out_shape, axes):
    """Where the channel axis ``axes`` of ``in_shape`` lands in ``out_shape`` (kept whole, or split into
    consecutive axes), or None."""
    if in_shape is None or out_shape is None or len(axes) != 1:
        return None
    a = axes[0] % len(in_shape) if in_shape else None
    if a is None:
        return None
    pre, c = _dim_key(in_shape[:a]), _dim_key([in_shape[a]])
    if pre is None or c is None:
        return None
    for b in range(len(out_shape) + 1):
        if _dim_key(out_shape[:b]) != pre:
            continue
        for e in range(b + 1, len(out_shape) + 1):
            k = _dim_key(out_shape[b:e])
            if k == c:
                # drop leading size-1 axes of a split, they do not tell channels apart
                span = tuple(i for i in range(b, e) if out_shape[i] != 1) or (b,)
                return span
            if k is None or (not c[1] and not k[1] and k[0] > c[0]):
                break
    return None


class _Graph:
    """Producers, shapes and source layers of one ONNX graph (the main graph)."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict | None = None):
        self.model = model
        g = model.graph
        self.producer = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.initializers = {t.name for t in g.initializer}
        self.shapes = _shapes(model, input_shapes)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def rank(self, name):
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def channel_axes(self, name: str, ndim: int | None = None) -> tuple[int, ...] | None:
        """The channel axes of tensor ``name`` as its producers define them, or None when unknown."""
        path = []
        cur = name
        for _ in range(10000):
            node = self.producer.get(cur)
            if node is None:
                return None
            op = node.op_type
            if (node.domain or "") not in ("", "ai.onnx"):
                return None
            if op in _AXIS1:
                axes = (1,)
                break
            if op == "MatMul" or op == "MatMulInteger":
                axes = (-1,)
                break
            if op in ("Concat",):
                axes = self._concat_axes(node, cur)
                break
            if op in ("Softmax", "LogSoftmax", "Hardmax"):
                axes = (_attr(node, "axis", -1 if self.opset >= 13 else 1),)
                break
            if op in _UNARY or op in _BINARY or op in _RESHAPES or op == "Transpose":
                nxt = self._data_input(node, cur)
                if nxt is None:
                    return None
                path.append((node, nxt, cur))
                cur = nxt
                continue
            return None
        else:
            return None
        # walk forward again through the ops between the defining producer and ``name``
        for node, src, dst in reversed(path):
            op = node.op_type
            if op == "Transpose":
                r = self.rank(src)
                perm = list(_attr(node, "perm", []) or [])
                if not perm:
                    if r is None:
                        return None
                    perm = list(range(r))[::-1]
                r = len(perm)
                axes = tuple(perm.index(a % r) for a in axes)
            elif op in _RESHAPES:
                mapped = _map_reshape(self.shapes.get(src), self.shapes.get(dst), axes)
                if mapped is None:
                    return None
                axes = mapped
            elif op in _BINARY:
                rs, rd = self.rank(src), self.rank(dst)
                if rs is not None and rd is not None and rs != rd:
                    axes = tuple((a % rs) + (rd - rs) for a in axes)
        return axes

    def _concat_axes(self, node, out_name) -> tuple[int, ...]:
        """A Concat's channel axes are its inputs' when they all agree (a detector head concatenating boxes
        and probabilities on the last axis, then scales over anchors, keeps the last axis as its channel);
        otherwise the concat axis itself (concatenating feature maps on axis 1 adds channels)."""
        r = self.rank(out_name)
        norm = (lambda axes: tuple(sorted(a % r for a in axes))) if r else (lambda axes: tuple(sorted(axes)))
        found = set()
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth < 64:
                for i in node.input:
                    if not i or i in self.initializers:
                        continue
                    a = self.channel_axes(i)
                    found.add(norm(a) if a is not None and (r or all(x >= 0 for x in a)) else None)
        finally:
            self._depth -= 1
        if len(found) == 1 and None not in found:
            return found.pop()
        return (_attr(node, "axis", 0),)

    def _data_input(self, node, out_name):
        op = node.op_type
        if op in _BINARY:
            r_out = self.rank(out_name)
            best = None
            for i in node.input:
                if not i or i in self.initializers or i not in self.producer:
                    continue
                if self.producer[i].op_type == "Constant":
                    continue
                if r_out is None or self.rank(i) in (None, r_out):
                    return i
                best = best or i
            return best
        return node.input[0] if node.input and node.input[0] else None


def _shapes(model: onnx.ModelProto, input_shapes: dict | None) -> dict:
    """Tensor name -> list of dims (int, symbol name, or None) from value_info, and from shape inference on a
    skeleton of the model (large initializers without their data) with the concrete input shapes."""
    def collect(g):
        out = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return out

    shapes = collect(model.graph)
    try:
        sk = onnx.ModelProto()
        sk.ir_version = model.ir_version
        sk.opset_import.extend(model.opset_import)
        g = sk.graph
        g.node.extend(model.graph.node)
        g.output.extend(model.graph.output)
        g.value_info.extend(model.graph.value_info)
        for vi in model.graph.input:
            v = g.input.add()
            v.CopyFrom(vi)
            if input_shapes and vi.name in input_shapes and vi.type.tensor_type.HasField("shape"):
                dims = v.type.tensor_type.shape.dim
                for d, val in zip(dims, input_shapes[vi.name]):
                    d.Clear()
                    d.dim_value = int(val)
        for t in model.graph.initializer:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            if n <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
                g.initializer.append(t)
            else:
                g.initializer.add(name=t.name, data_type=t.data_type, dims=list(t.dims))
        inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False)
        shapes.update({k: v for k, v in collect(inferred.graph).items() if all(d is not None for d in v)
                       or k not in shapes})
    except Exception as exc:  # shapes are a help for the channel axis, not a requirement
        log.debug("shape inference for channel axes failed: %s", exc)
    return shapes
