"""Loading PyTorch models from the command line: factory specs, weights, input shapes.

* A factory spec is ``package.module:callable`` (``torchvision.models:resnet18``,
  ``bnfold.models.zoo:small_resnet``); the callable is called without arguments and must return an
  ``nn.Module``. A bare zoo name (``small_resnet``) is accepted as a shortcut.
* Weights are a state dict in ``.pt``/``.pth`` (loaded with ``torch.load(weights_only=True)``; a pickle that
  needs more is refused unless ``trust_pickle`` is set, because unpickling runs code from the file) or
  ``.safetensors``. A checkpoint may wrap the state dict under ``state_dict`` or ``model``; bnfold's own
  training checkpoints do.
* Weights are never silent (:func:`choose_weights`): a spec without a weights file is refused unless random
  weights are asked for explicitly (``random_weights``, for smoke tests); a zoo model without a file gets the
  zoo's own weights (a seeded initialisation with randomized BN statistics), and the caller is told so.
  Whatever was used is recorded as :class:`WeightsSource` (file and sha256, or seed) in every output.
* Input shapes are ``1x3x224x224`` or ``NAME=1x3x224x224``, one per model input.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.specs import MAX_INPUT_ELEMENTS, InputSpec, is_onnx_path, parse_input_shape  # noqa: F401 (re-exported)

_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


RANDOM_SEED = 0  # the seed of --random-weights and of the zoo's own weights


@dataclass
class WeightsSource:
    """Where a PyTorch model's weights came from: a ``file`` (with its sha256), ``random`` (the factory's
    initialisation under ``torch.manual_seed(seed)``, asked for explicitly) or ``zoo`` (a zoo model's own
    weights: the seeded initialisation with BN statistics randomized by :func:`bnfold.models.zoo.randomize_bn`,
    so that folding them is not an identity)."""

    kind: str
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    statistics: str | None = None  # where the BN statistics came from, when known (a training checkpoint)

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.path} (sha256 {self.sha256})"
        if self.kind == "random":
            return f"random, seed {self.seed}"
        return f"the zoo's own: random, seed {self.seed}, BatchNorm statistics randomized (not trained)"

    def statistics_source(self) -> str:
        if self.statistics:
            return self.statistics
        if self.kind == "file":
            return f"the weights file {self.path}"
        if self.kind == "random":
            return "the factory's initialisation (identity BatchNorm statistics unless the factory sets them)"
        return f"randomized, seed {self.seed} (zoo.randomize_bn)"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "weights": self.describe(), "statistics": self.statistics_source()}
        if self.kind == "file":
            d.update(path=self.path, sha256=self.sha256)
        else:
            d["seed"] = self.seed
        return d


def zoo_name(spec: str) -> str | None:
    """The zoo model ``spec`` names (``small_resnet`` or ``bnfold.models.zoo:small_resnet``), else None."""
    from bnfold.models import zoo

    base = spec.partition("@")[0]
    name = base.removeprefix("bnfold.models.zoo:")
    return name if ":" not in name and name in zoo.names() else None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def choose_weights(spec: str, weights: str | Path | None = None, random_weights: bool = False) -> WeightsSource:
    """The weights policy shared by every command that builds a PyTorch SPEC: a weights file (its sha256
    recorded); random weights only when asked for; a zoo model's own weights by default (the caller says so);
    anything else is refused naming both options. Raises :class:`BnfoldError`; reads only ``weights``."""
    if weights is not None and random_weights:
        raise BnfoldError("--weights and --random-weights exclude each other: give one")
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise BnfoldError(f"{p}: no such weights file")
        stats = _checkpoint_statistics(p)
        return WeightsSource("file", str(p), sha256_file(p), statistics=stats)
    if random_weights:
        return WeightsSource("random", seed=RANDOM_SEED)
    if zoo_name(spec) is not None:
        return WeightsSource("zoo", seed=RANDOM_SEED)
    if ":" not in spec or not is_factory_spec(spec):
        resolve_factory(spec)  # not a model at all: that error first (imports nothing)
    raise BnfoldError(f"'{spec}' is a PyTorch model and no weights were given: pass --weights FILE (its state "
                      "dict), or --random-weights to use a random initialisation on purpose (smoke tests only)")


def _checkpoint_statistics(p: Path) -> str | None:
    """Where a bnfold checkpoint's BN statistics came from (train/calibrate record it), else None."""
    try:
        config = read_checkpoint_config(p)
    except BnfoldError:
        return None
    cal = (config or {}).get("calibration")
    if not isinstance(cal, dict):
        return None
    data = cal.get("data") or (config or {}).get("data") or "unrecorded data"
    samples = f" ({cal['samples']} samples)" if cal.get("samples") else ""
    return f"{cal.get('method', 'algorithm2')} over {data}{samples}, recorded in the checkpoint"


def torch_message(exc: BaseException, limit: int = 200) -> str:
    """The first line of a torch exception's message, without the terminal escape sequences (bold, colours)
    torch puts in some (``weights_only`` refusals): text for one error line, not for a terminal."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


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
        msg = torch_message(exc)
        if "Weights only load failed" in msg:
            msg = "it pickles objects besides tensors"
        if not trust_pickle:
            raise BnfoldError(
                f"{p}: refusing to load: it is not a weights-only checkpoint ({msg}). Loading it would run "
                "code from the file; if you trust it, pass --trust-pickle") from None
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise BnfoldError(f"{p}: cannot load checkpoint ({torch_message(exc2)})") from None
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


def load_torch_model(spec: str, *, weights: str | Path | WeightsSource | None = None, trust_pickle: bool = False,
                     input_shapes: list[str] | None = None,
                     random_weights: bool = False) -> tuple[nn.Module, tuple, list[str] | None]:
    """Build, load and put in eval mode the model named by ``spec``; return it with example inputs and the
    input names from ``NAME=`` shapes (None when unnamed). ``weights`` is a file or the
    :class:`WeightsSource` :func:`choose_weights` returned; without one, :func:`choose_weights`' policy
    applies (refused unless ``random_weights`` or a zoo model)."""
    if is_onnx_path(spec) and not Path(spec).exists():
        raise BnfoldError(f"{spec}: no such file")
    source = weights if isinstance(weights, WeightsSource) else choose_weights(spec, weights, random_weights)
    model, default_shape = build_weighted(spec, source, trust_pickle=trust_pickle)
    specs = [parse_input_shape(s) for s in (input_shapes or [])]
    names = [s.name for s in specs] if specs and all(s.name for s in specs) else None
    inputs = example_inputs(specs, default_shape)
    check_forward(model, inputs)
    return model, inputs, names


def check_forward(model: nn.Module, inputs: tuple) -> None:
    """Run ``model`` once on ``inputs`` (no grad): an input shape the model cannot take (a wrong channel
    count) becomes a one-line :class:`BnfoldError` naming the shape, before any tracer prints its internals."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        msg = torch_message(exc, 300)
        raise BnfoldError(f"the model cannot run on input shape {shapes}: {msg}; check --input-shape (the "
                          "channel count, the spatial size)") from None


def build_weighted(spec: str, source: WeightsSource, *, trust_pickle: bool = False) -> tuple[nn.Module, tuple | None]:
    """The model ``spec`` with the weights ``source`` names, in eval mode, and its default input shape."""
    model, default_shape = build_model(spec)
    if source.kind == "file":
        apply_weights(model, load_state_dict(source.path, trust_pickle=trust_pickle), str(source.path))
    elif source.kind == "zoo":
        from bnfold.models import zoo
        zoo.randomize_bn(model, seed=source.seed)
    return model.eval(), default_shape


def build_variant(spec: str, shapes: list[InputSpec], weights: str | Path | WeightsSource | None = None, *,
                  trust_pickle: bool = False, random_weights: bool = False) -> tuple[str, nn.Module, tuple]:
    """``SPEC`` (as built), ``SPEC@folded`` (BN folded at module level) or ``SPEC@nobn`` (BN replaced by
    Identity: the latency floor no fold can beat); returns ``(spec, module in eval mode, first input shape)``.
    ``weights``/``random_weights``: as :func:`choose_weights` (the same policy as every other command)."""
    base, _, variant = spec.partition("@")
    if variant not in ("", "folded", "nobn"):
        raise BnfoldError(f"'{spec}': unknown variant '@{variant}' (use @folded or @nobn)")
    source = weights if isinstance(weights, WeightsSource) else choose_weights(base, weights, random_weights)
    model, default_shape = build_weighted(base, source, trust_pickle=trust_pickle)
    return make_variant(spec, model, example_inputs(shapes, default_shape))


def make_variant(spec: str, model: nn.Module, inputs: tuple) -> tuple[str, nn.Module, tuple]:
    """The variant ``spec`` names (``SPEC``, ``SPEC@folded``, ``SPEC@nobn``) of ``model`` (built and loaded,
    e.g. by :func:`load_torch_model`): ``(spec, module in eval mode, first input shape)``."""
    from bnfold.torch_fold import fold_module, strip_batchnorm

    variant = spec.partition("@")[2]
    if variant not in ("", "folded", "nobn"):
        raise BnfoldError(f"'{spec}': unknown variant '@{variant}' (use @folded or @nobn)")
    model.eval()
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
