"""Loading PyTorch models from the command line: factory specs, weights, input shapes.

* A factory spec is ``package.module:callable`` (``torchvision.models:resnet18``,
  ``bnfold.models.zoo:small_resnet``); the callable is called without arguments and must return an
  ``nn.Module``. A bare zoo name (``small_resnet``) is accepted as a shortcut.
* Weights are a state dict in ``.pt``/``.pth`` (loaded with ``torch.load(weights_only=True)``; a pickle that
  needs more is refused unless ``trust_pickle`` is set, because unpickling runs code from the file) or
  ``.safetensors``. A checkpoint may wrap the state dict under ``state_dict`` or ``model``; bnfold's own
  training checkpoints do.
* Input shapes are ``1x3x224x224`` or ``NAME=1x3x224x224``, one per model input.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.specs import MAX_INPUT_ELEMENTS, InputSpec, is_onnx_path, parse_input_shape  # noqa: F401 (re-exported)

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_factory_spec(text: str) -> bool:
    return bool(_SPEC.match(text))


def resolve_factory(spec: str):
    """Import ``package.module:callable`` (or a zoo name) and return (callable, default input shape or None)."""
    from bnfold.models import zoo

    if ":" not in spec:
        if spec in zoo.names():
            entry = zoo.get(spec)
            return entry.factory, entry.input_shape
        raise BnfoldError(f"'{spec}' is neither an existing .onnx file, a factory spec 'package.module:callable' "
                          f"nor a zoo model ({', '.join(zoo.names())})")
    if not is_factory_spec(spec):
        raise BnfoldError(f"'{spec}' is not a factory spec: expected 'package.module:callable'")
    mod_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except SystemExit as exc:
        raise BnfoldError(f"importing '{mod_name}' for '{spec}' called sys.exit({exc.code!r}); "
                          "a model module must not exit") from None
    except Exception as exc:
        raise BnfoldError(f"cannot import '{mod_name}' for '{spec}' ({type(exc).__name__}: {exc}); "
                          "is the package installed and on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BnfoldError(f"'{mod_name}' has no attribute '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BnfoldError(f"'{spec}' is not callable")
    default_shape = None
    if mod_name == "bnfold.models.zoo" and attr in zoo.names():
        default_shape = zoo.get(attr).input_shape
    return obj, default_shape


def build_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    factory, default_shape = resolve_factory(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a deterministic initialisation when no weights are given
            model = factory()
    except SystemExit as exc:
        raise BnfoldError(f"calling '{spec}' called sys.exit({exc.code!r}); a factory must return a module, "
                          "not exit") from None
    except Exception as exc:
        raise BnfoldError(f"calling '{spec}' failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model, default_shape


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such weights file")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors is a dependency
            raise BnfoldError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from None
        try:
            return load_file(str(p))
        except Exception as exc:
            raise BnfoldError(f"{p}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not trust_pickle:
            raise BnfoldError(
                f"{p}: refusing to load: it is not a weights-only checkpoint ({msg[:200]}). Loading it would run "
                "code from the file; if you trust it, pass --trust-pickle") from None
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise BnfoldError(f"{p}: cannot load checkpoint ({exc2})") from None
    return _unwrap_state_dict(obj, p)


def _unwrap_state_dict(obj, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise BnfoldError(f"{p}: no state dict found (expected a dict of tensors, optionally under 'state_dict')")


def _strip_module_prefix(key: str) -> str:
    return "" if key == "module" else key.removeprefix("module.")


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Load ``state`` into ``model`` strictly. The state dict's ``_metadata`` (per-module versions, which some
    modules' ``_load_from_state_dict`` read, e.g. torchvision's MNASNet) is kept; where the checkpoint has none
    (safetensors, a rebuilt dict) the model's own versions are used."""
    from collections import OrderedDict

    own = model.state_dict()
    meta = OrderedDict(getattr(own, "_metadata", None) or {})
    meta.update({_strip_module_prefix(k): v for k, v in (getattr(state, "_metadata", None) or {}).items()})
    state = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())  # DataParallel/DDP checkpoints
    state._metadata = meta
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = []
        if missing:
            parts.append(f"missing {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {show(unexpected)}")
        raise BnfoldError(f"{label}: checkpoint keys do not match the model ({'; '.join(parts)}); "
                          "is it the checkpoint of this architecture?")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise BnfoldError(f"{label}: '{k}' has shape {tuple(state[k].shape)} in the checkpoint but "
                          f"{tuple(own[k].shape)} in the model")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # a module's own loader refusing the checkpoint (a version, a shape it checks)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnfoldError(f"{label}: the model refuses the checkpoint ({type(exc).__name__}: {msg[:200]})") from None


def example_inputs(shapes: list[InputSpec], default_shape: tuple[int, ...] | None, seed: int = 0) -> tuple:
    if not shapes:
        if default_shape is None:
            raise BnfoldError("the model's input shape is unknown: pass --input-shape, e.g. --input-shape 1x3x224x224")
        shapes = [InputSpec(None, tuple(default_shape))]
    g = torch.Generator().manual_seed(seed)
    try:
        return tuple(torch.randn(s.shape, generator=g) for s in shapes)
    except (RuntimeError, MemoryError) as exc:
        shape = "x".join(map(str, max((s.shape for s in shapes), key=math.prod)))
        raise BnfoldError(f"cannot allocate an example input of shape {shape} ({type(exc).__name__}); "
                          "pass a smaller --input-shape") from None


def load_torch_model(spec: str, *, weights: str | Path | None = None, trust_pickle: bool = False,
                     input_shapes: list[str] | None = None) -> tuple[nn.Module, tuple, list[str] | None]:
    """Build, load and put in eval mode the model named by ``spec``; return it with example inputs and the
    input names from ``NAME=`` shapes (None when unnamed)."""
    if is_onnx_path(spec) and not Path(spec).exists():
        raise BnfoldError(f"{spec}: no such file")
    model, default_shape = build_model(spec)
    if weights is not None:
        apply_weights(model, load_state_dict(weights, trust_pickle=trust_pickle), str(weights))
    model.eval()
    specs = [parse_input_shape(s) for s in (input_shapes or [])]
    names = [s.name for s in specs] if specs and all(s.name for s in specs) else None
    return model, example_inputs(specs, default_shape), names


def build_variant(spec: str, shapes: list[InputSpec]) -> tuple[str, nn.Module, tuple]:
    """``SPEC`` (as built), ``SPEC@folded`` (BN folded at module level) or ``SPEC@nobn`` (BN replaced by
    Identity: the latency floor no fold can beat); returns ``(spec, module in eval mode, first input shape)``."""
    from bnfold.torch_fold import fold_module, strip_batchnorm

    base, _, variant = spec.partition("@")
    if variant not in ("", "folded", "nobn"):
        raise BnfoldError(f"'{spec}': unknown variant '@{variant}' (use @folded or @nobn)")
    model, default_shape = build_model(base)
    model.eval()
    inputs = example_inputs(shapes, default_shape)
    if variant == "folded":
        model = fold_module(model, inputs).module
    elif variant == "nobn":
        model = strip_batchnorm(model)
    return spec, model, tuple(inputs[0].shape)


def read_checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The bnfold config stored in a checkpoint, or None (reads no pickle). A config that is present but
    not a JSON object is bad input (:class:`BnfoldError`)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            text = meta.get("bnfold.config")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            text = obj.get("bnfold") if isinstance(obj, dict) else None
    except Exception:
        return None
    if text is None:
        return None
    try:
        config = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise BnfoldError(f"{p}: its bnfold config is not a JSON object; remove the 'bnfold.config' metadata "
                          "(or the 'bnfold' entry) or write it as a JSON object")
    return config
