"""Run the reference and the candidate: ONNX Runtime sessions, or an eager PyTorch module."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.runtime import make_session


class _OnnxRunner:
    def __init__(self, model, ep: str, opt_level: str, role: str, extra_outputs: list[str] | None = None):
        self.role = role
        self.model = _as_model(model)
        src = self.model
        self.extra = [n for n in (extra_outputs or []) if n not in {o.name for o in src.graph.output}]
        if self.extra:
            src = _with_outputs(src, self.extra)
            self.extra = [n for n in self.extra if n in {o.name for o in src.graph.output}]
        try:
            self.sess = make_session(src, ep=ep, opt_level=opt_level)
        except BnfoldError as exc:
            raise BnfoldError(f"the {role} model: {exc}") from None
        self.inputs = self.sess.get_inputs()
        self.output_names = [o.name for o in self.sess.get_outputs()][:len(self.sess.get_outputs()) - len(self.extra)]
        self.overridable = {i.name for i in self.sess.get_overridable_initializers()}
        self.providers = self.sess.get_providers()

    def run(self, feeds: dict) -> tuple[list[np.ndarray], dict]:
        try:
            outs = self.sess.run(None, {k: v for k, v in feeds.items()
                                        if k in self.overridable or k in {i.name for i in self.inputs}})
        except Exception as exc:
            raise BnfoldError(f"ONNX Runtime cannot run the {self.role} model: {_one_line(exc)}") from None
        n = len(outs) - len(self.extra)
        return outs[:n], dict(zip(self.extra, outs[n:]))


class _TorchRunner:
    role = "reference"

    def __init__(self, module, device: str):
        import copy

        import torch
        self.torch = torch
        current = next((p.device.type for p in module.parameters()), "cpu")
        # never move the caller's module: run a copy when it lives on another device
        self.module = (module if current == device else copy.deepcopy(module).to(device)).eval()
        self.device = device
        self.providers = [f"torch-{device}"]
        self.overridable = set()

    def run(self, feeds: dict) -> tuple[list[np.ndarray], dict]:
        return _run_module(self.torch, self.module, self.device, feeds), {}


def _one_line(exc: Exception, limit: int = 1000) -> str:
    """An exception's message on one line (its lines joined), cut only beyond ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = "; ".join(lines) if lines else type(exc).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _run_module(torch, module, device, feeds: dict) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in feeds.values()])
    except Exception as exc:
        raise BnfoldError(f"the reference PyTorch module fails on the inputs: {_one_line(exc, 300)}") from None
    if isinstance(out, torch.Tensor):
        out = [out]
    elif isinstance(out, dict):
        out = list(out.values())
    return [o.detach().float().cpu().numpy() if o.dtype == torch.bfloat16 else o.detach().cpu().numpy()
            for o in out]


# ------------------------------------------------------------------------------------------------ parameters
#: ops whose float initializer inputs are parameters a fold rounds (not shapes, scales, pads or ranges)
_PARAM_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul", "Div",
              "InstanceNormalization", "LayerNormalization", "GroupNormalization", "PRelu", "Sum", "Einsum"}


class OnnxParamRunner:
    """The reference ONNX model with its float parameters (initializers that only parameter-taking ops read)
    exposed as overridable inputs: ``run(feeds, params)`` runs it with other values for them, in one session.
    ``bns``: per BatchNormalization whose parameters are all exposed, its label and the values that make it
    the identity."""

    def __init__(self, model: onnx.ModelProto, ep: str, role: str = "reference"):
        from onnx import numpy_helper

        g = model.graph
        inputs = {i.name for i in g.input}
        consumers: dict[str, set[str]] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, set()).add(n.op_type if (n.domain or "") in ("", "ai.onnx") else "?")
        float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                       onnx.TensorProto.BFLOAT16)
        self.params: dict[str, np.ndarray] = {}
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in g.initializer:
            if (t.data_type in float_types and t.name not in inputs and consumers.get(t.name)
                    and consumers[t.name] <= _PARAM_OPS):
                self.params[t.name] = numpy_helper.to_array(t)
                m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        if self.params and m.ir_version < 4:
            m.ir_version = 4
        self.bns: list[tuple[str, dict[str, np.ndarray]]] = []
        for n in g.node:
            if n.op_type != "BatchNormalization" or (n.domain or "") not in ("", "ai.onnx") or len(n.input) < 5:
                continue
            names = list(n.input[1:5])
            if not all(x in self.params for x in names):
                continue
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            dt = self.params[names[0]].dtype
            shapes = [self.params[x].shape for x in names]
            ident = [np.ones(shapes[0], dt), np.zeros(shapes[1], dt), np.zeros(shapes[2], dt),
                     np.full(shapes[3], 1.0 - eps, self.params[names[3]].dtype)]
            self.bns.append((n.name or f"BatchNormalization@{n.output[0]}", dict(zip(names, ident))))
        self.runner = _OnnxRunner(m, ep, "off", role)

    def run(self, feeds: dict, params: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run({**feeds, **params})[0]


class TorchParamRunner:
    """A copy of the reference module whose parameters and float buffers ``run(feeds, params)`` replaces;
    ``bns``: per BatchNorm module with running statistics, its name and the values that make it the identity."""

    def __init__(self, module, device: str):
        import copy

        import torch
        self.torch, self.device = torch, device
        self.module = copy.deepcopy(module).to(device).eval()
        self.state = self.module.state_dict(keep_vars=False)
        self.params = {k: v.detach().cpu().numpy().copy() for k, v in self.state.items()
                       if v.is_floating_point() and v.dtype != torch.bfloat16}
        self.bns: list[tuple[str, dict[str, np.ndarray]]] = []
        for name, m in self.module.named_modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
                continue
            p = f"{name}." if name else ""
            ident = {f"{p}running_mean": np.zeros_like(self.params[f"{p}running_mean"]),
                     f"{p}running_var": np.full_like(self.params[f"{p}running_var"], 1.0 - m.eps)}
            if m.affine:
                ident[f"{p}weight"] = np.ones_like(self.params[f"{p}weight"])
                ident[f"{p}bias"] = np.zeros_like(self.params[f"{p}bias"])
            self.bns.append((name, ident))

    def run(self, feeds: dict, params: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            for k, v in params.items():
                self.state[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        return _run_module(torch, self.module, self.device, feeds)

def _as_model(m) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    try:
        return onnx.load(str(m))
    except Exception as exc:
        raise BnfoldError(f"{m}: not a readable ONNX model ({str(exc).strip()[:200]})") from None


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:
        types = {}
    types.update({vi.name: vi for vi in list(model.graph.value_info) if vi.name not in types})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n in existing:
            continue
        if n in types and types[n].type.HasField("tensor_type"):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[n])
            vi.type.tensor_type.ClearField("shape")
            m.graph.output.append(vi)
    return m
