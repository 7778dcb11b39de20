"""Datasets: the handwritten digits bundled with scikit-learn (no download), ``.npz`` files, image folders.

``digits`` means the same thing in every command that evaluates (verify, run, demo): the held-out split
`train` reports its test accuracy on (359 of the 1,797 samples; the split is fixed: 20%, seed 0). Calibration
(`calibrate`, `run --calibrate-data`) reads ``digits`` as the training split `train` trains on. ``digits:all``,
``digits:train`` and ``digits:test`` name a part explicitly; the dataset's name says which part was used.

Every loader returns a :class:`Dataset`: ``inputs`` maps input names (or ``"x"`` for single-input data) to
float32 arrays with the sample axis first, ``labels`` is an int64 array or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    name: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0  # `train` splits every dataset with this seed, whatever its --seed: one held-out split
DIGITS_PARTS = ("test", "train", "all")


def holdout_split(n: int, test_fraction: float = DIGITS_TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, held-out indices)`` of ``n`` samples: the split `train` uses (fixed seed)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def load_digits(part: str = "all") -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1], as (N, 64) float32 plus labels:
    ``part`` ``"all"``, ``"train"`` (what `train` trains on) or ``"test"`` (its held-out split)."""
    if part not in DIGITS_PARTS:
        raise BnfoldError(f"'digits:{part}': choose digits (the held-out split), digits:train or digits:all")
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise BnfoldError("the embedded digits need scikit-learn: pip install scikit-learn") from None
    d = _load()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    n = len(x)
    name = f"digits:all (all {n:,} samples, {n - round(n * DIGITS_TEST_FRACTION):,} of which train trains on)"
    if part != "all":
        tr, te = holdout_split(n)
        idx = tr if part == "train" else te
        x, y = x[idx], y[idx]
        name = (f"digits (the held-out split train reports: {len(idx):,} of {n:,} samples)" if part == "test" else
                f"digits:train (the training split: {len(idx):,} of {n:,} samples)")
    return Dataset({"x": x}, y, name, [str(c) for c in range(10)])


def is_digits(spec) -> bool:
    return isinstance(spec, str) and (spec == "digits" or spec.startswith("digits:"))


def for_calibration(spec):
    """``--data`` of a calibration: plain ``digits`` is the training split (statistics come from training
    data, as `train`'s Algorithm 2 statistics do); anything else as given."""
    return "digits:train" if isinstance(spec, str) and spec == "digits" else spec


def load_npz(path: str | Path) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise BnfoldError(f"{p}: no such data file")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise BnfoldError(f"{p}: not a readable .npz file ({exc}); object arrays are refused") from None
    for key, a in arrays.items():
        _check_npz_array(p, key, a)
    labels = None
    for key in ("labels", "y"):
        if key in arrays:
            labels = _labels(p, key, arrays.pop(key))
            break
    if not arrays:
        raise BnfoldError(f"{p}: no input arrays (expected 'x' or arrays named after the model inputs)")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1 or (labels is not None and len(labels) not in n):
        raise BnfoldError(f"{p}: arrays have different numbers of samples")
    return Dataset({k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}, labels, p.name)


def load_image_folder(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> Dataset:
    """One subfolder per class; images resized to ``size`` (H, W), scaled to [0, 1], channels first."""
    try:
        from PIL import Image
    except ImportError:
        raise BnfoldError("reading an image folder needs Pillow: pip install pillow") from None
    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise BnfoldError(f"{root}: no class subfolders (expected one folder of images per class)")
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue  # a FIFO, device or folder named like an image is never opened
            try:
                img = Image.open(f).convert("L" if channels == 1 else "RGB")
            except Exception as exc:
                raise BnfoldError(f"{f}: not a readable image ({exc})") from None
            if size is not None:
                img = img.resize((size[1], size[0]))
            a = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(i)
    if not xs:
        raise BnfoldError(f"{root}: no images found in the class subfolders")
    if len({x.shape for x in xs}) != 1:
        raise BnfoldError(f"{root}: images have different sizes; pass the model's input shape so they are resized")
    return Dataset({"x": np.stack(xs)}, np.asarray(ys, np.int64), root.name, classes)


def load_dataset(spec: str | Path, *, image_size: tuple[int, int] | None = None, channels: int = 3) -> Dataset:
    """``digits`` (the held-out split; ``digits:train``, ``digits:all``), a ``.npz`` file, or an image folder."""
    if is_digits(str(spec)):
        part = str(spec).partition(":")[2] or "test"
        return load_digits(part)
    p = Path(spec)
    if p.is_dir():
        return load_image_folder(p, image_size, channels)
    if p.suffix == ".npz" or p.is_file():
        return load_npz(p)
    raise BnfoldError(f"--data '{spec}': not 'digits' (or digits:all, digits:train), an existing .npz file or an "
                      "image folder")


LAYOUTS = ("nchw", "nhwc")


def fit_to_shape(x: np.ndarray, sample_shape: tuple, *, layout: str = "nchw") -> np.ndarray:
    """Samples ``x`` (sample axis first) in the model's per-sample shape ``sample_shape`` (channels first).

    * ``layout="nhwc"``: ``x`` is channels-last, (N, ..., C): its last axis moves to axis 1.
    * Flat samples, (N, F), are reshaped when the element counts match ((N, 64) -> (N, 1, 8, 8)).
    * Samples that keep the channel count and only merge or split the trailing axes ((N, C, H*W) ->
      (N, C, H, W)) are reshaped.

    Anything else is refused, and so is data that would fit only after a transpose: (N, H, W, C) data for an
    (N, C, H, W) model is never silently reshaped (the message names ``--layout nhwc``)."""
    if layout not in LAYOUTS:
        raise BnfoldError(f"unknown data layout '{layout}': choose one of {', '.join(LAYOUTS)}")
    x = np.asarray(x)
    sample = tuple(int(d) for d in sample_shape)
    if layout == "nhwc":
        if x.ndim < 3:
            raise BnfoldError(f"--layout nhwc: data samples have shape {tuple(x.shape[1:])}, not channels-last "
                              "images (N, H, W, C)")
        x = np.moveaxis(x, -1, 1)
        if tuple(x.shape[1:]) != sample:
            raise BnfoldError(f"--layout nhwc: data samples have shape {tuple(x.shape[1:])} in channels-first "
                              f"order but the model expects {sample}")
        return np.ascontiguousarray(x)
    got = tuple(x.shape[1:])
    if got == sample:
        return x
    if x.ndim >= 3 and len(sample) >= 2 and tuple(np.moveaxis(np.empty((0,) + got), -1, 1).shape[1:]) == sample:
        raise BnfoldError(f"data samples have shape {got}, which is the model's {sample} in channels-last "
                          "(NHWC) order: pass --layout nhwc (layout='nhwc') if the data is channels-last, or "
                          "transpose it to channels-first")
    if int(np.prod(got)) == int(np.prod(sample)):
        if x.ndim == 2 or (len(got) >= 1 and len(sample) >= 1 and got[0] == sample[0] and x.ndim >= 3):
            return x.reshape((len(x),) + sample)
        raise BnfoldError(f"data samples have shape {got} but the model expects {sample}: the element counts "
                          "match but the layouts differ; reshape the data yourself if that is what you mean")
    raise BnfoldError(f"data samples have shape {got} but the model expects {sample}")


def shape_samples(x: np.ndarray, sample_shape: tuple, *, layout: str = "nchw") -> np.ndarray:
    """Samples in the model's per-sample shape: flat square samples (the bundled 8x8 digits, (N, 64)) become
    images when the model takes images (bilinear upsampling, the gray channel repeated); anything else goes
    through :func:`fit_to_shape`."""
    x = np.asarray(x)
    sample = tuple(int(d) for d in sample_shape)
    if x.dtype.kind == "f" and x.ndim == 2 and len(sample) == 3 and tuple(x.shape[1:]) != sample \
            and layout == "nchw":
        side = int(round(float(np.sqrt(x.shape[1]))))
        if side * side == x.shape[1]:
            import torch
            import torch.nn.functional as F

            img = torch.from_numpy(np.ascontiguousarray(x, np.float32)).reshape(len(x), 1, side, side)
            if (side, side) != sample[1:]:
                img = F.interpolate(img, size=sample[1:], mode="bilinear", align_corners=False)
            return img.repeat(1, sample[0], 1, 1).contiguous().numpy()
    return fit_to_shape(x, sample, layout=layout)


def load_for_model(spec: str | Path | Dataset, inputs: list[tuple[str | None, tuple]] | None, *,
                   layout: str = "nchw") -> Dataset:
    """``--data`` for a model whose inputs are ``[(name, shape with batch), ...]`` (None: unknown): image
    folders resized to the input's height and width, arrays shaped channels-first for the model (see
    :func:`shape_samples`; ``layout`` says whether the arrays are ``nchw`` or ``nhwc``). Raises
    :class:`BnfoldError` when the data does not fit, before anything is written."""
    size, channels = None, 3
    first = inputs[0][1] if inputs else None
    if first is not None and len(first) == 4:
        channels, size = int(first[1]), (int(first[2]), int(first[3]))
    ds = spec if isinstance(spec, Dataset) else load_dataset(spec, image_size=size, channels=channels)
    if not isinstance(spec, Dataset) and Path(spec).is_dir():
        layout = "nchw"  # image folders are read channels-first
    if not inputs:
        if layout == "nhwc":
            ds = Dataset({k: np.ascontiguousarray(np.moveaxis(v, -1, 1)) if v.ndim >= 3 else v
                          for k, v in ds.inputs.items()}, ds.labels, ds.name, ds.classes)
        return ds
    names = [n for n, _ in inputs]
    if len(inputs) == 1 and len(ds.inputs) == 1:
        key = next(iter(ds.inputs))
        arrays = {key: shape_samples(ds.inputs[key], tuple(first[1:]), layout=layout)}
    elif all(n in ds.inputs for n in names):
        arrays = dict(ds.inputs)
        for n, shape in inputs:
            arrays[n] = shape_samples(ds.inputs[n], tuple(shape[1:]), layout=layout)
    else:
        raise BnfoldError(f"the data has arrays {sorted(ds.inputs)} but the model's inputs are {names}: "
                          "name the .npz arrays after the inputs")
    return Dataset(arrays, ds.labels, ds.name, ds.classes)


def sample_shape_of(ds: Dataset, *, layout: str = "nchw") -> tuple:
    """The per-sample shape of the dataset's first array, channels first."""
    x = next(iter(ds.inputs.values()))
    if layout == "nhwc" and x.ndim >= 3:
        return tuple(np.moveaxis(np.empty((0,) + tuple(x.shape[1:])), -1, 1).shape[1:])
    return tuple(x.shape[1:])


def _check_npz_array(p: Path, key: str, a: np.ndarray) -> None:
    """Arrays are numbers with a sample axis: no 0-d arrays, strings, bytes or objects."""
    if a.dtype.kind not in "biuf":
        raise BnfoldError(f"{p}: array '{key}' has dtype {a.dtype}; inputs and labels must be numbers")
    if a.ndim == 0:
        raise BnfoldError(f"{p}: array '{key}' is a scalar; every array needs the sample axis first")


def _labels(p: Path, key: str, a: np.ndarray) -> np.ndarray:
    """Class indices: integers >= 0 (floats only when they hold whole numbers)."""
    a = np.asarray(a).reshape(-1)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise BnfoldError(f"{p}: '{key}' holds non-integer values; labels are class indices 0, 1, 2, ...")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int64).max):
        raise BnfoldError(f"{p}: '{key}' holds negative or huge values (min {a.min()}); labels are class "
                          "indices 0, 1, 2, ...")
    return a.astype(np.int64)
