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
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BnfoldError(f"ONNX Runtime cannot run the {self.role} model: {msg[:300]}") from None
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
        torch = self.torch
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feeds.values()])
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BnfoldError(f"the reference PyTorch module fails on the inputs: {msg[:300]}") from None
        if isinstance(out, torch.Tensor):
            out = [out]
        elif isinstance(out, dict):
            out = list(out.values())
        return [o.detach().float().cpu().numpy() if o.dtype == torch.bfloat16 else o.detach().cpu().numpy()
                for o in out], {}

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
