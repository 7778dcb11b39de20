"""Issue #13's attempts, each rerun: nothing a user owns is lost or silently replaced, every bad input is
exit 2 with one line, text from files is shown as data (never markup or terminal control), --json is JSON.

Every test snapshots the folder before and after (bytes of every file, kind of every special file) to show
"nothing written, input unchanged" where the command is refused."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold import count_bn
from bnfold.cli.main import main
from bnfold.outputs import markdown_text, printable, strict_json

from .helpers import G

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run(*args, cwd=None):
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        if cwd is not None:
            os.chdir(old)


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: file bytes, link targets, kinds of special files (lstat, no following)."""
    snap = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                snap[rel] = ("file", p.read_bytes())
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("special", stat.S_IFMT(st.st_mode))
    return snap


def assert_bad_input(r, before=None, folder=None, match=None, usage_ok=False):
    """Exit 2, one line starting with 'error:' (or click's usage error), and (with a snapshot) nothing changed."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    if usage_ok and lines[0].startswith("Usage:"):
        lines = [lines[-1]]
    assert len(lines) == 1 and lines[0].startswith(("error:", "Error:")), r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    if match:
        assert re.search(match, lines[0]), lines[0]
    if before is not None:
        assert snapshot(folder) == before


def small_model(name_a="bn_a", name_b="bn_b", c=4, prefix=""):
    g = G(prefix=prefix)
    x = g.input("x", [1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, c, pads=[1, 1, 1, 1], name="conv"), c, name=name_a)
    y = g.bn(g.node("Relu", [y]), c, name=name_b)
    return g.model([y])


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    return p


def save_external(model, path: Path, location: str):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, path, save_as_external_data=True, location=location, size_threshold=0)


@pytest.fixture
def ext_model(tmp_path):
    p = tmp_path / "m.onnx"
    save_external(small_model(c=16), p, "m.onnx.data")
    return p


@pytest.fixture
def weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bnfold.models import zoo
    model = zoo.get("mnist_mlp").factory()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    return tmp_path / "w.safetensors", tmp_path / "w.pt"


# ------------------------------------------------------------------------------------------------ 1. the plan
@pytest.mark.parametrize("dry_run", [False, True])
def test_report_equal_to_the_input_is_refused(model_path, tmp_path, dry_run):
    before = snapshot(tmp_path)
    r = run("fold", model_path, "-o", tmp_path / "out.onnx", "--report", model_path, *(["--dry-run"] * dry_run))
    assert_bad_input(r, before, tmp_path, "--report .*m.onnx is the input file")


def test_report_equal_to_the_output_is_refused(model_path, tmp_path):
    before = snapshot(tmp_path)
    r = run("fold", model_path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "." / "out.onnx")
    assert_bad_input(r, before, tmp_path, "are the same file")
    r = run("export", "mnist_mlp", "-o", tmp_path / "e.onnx", "--report", tmp_path / "e.onnx")
    assert_bad_input(r, before, tmp_path, "are the same file")


def test_weights_as_output_are_refused(weights, tmp_path):
    st, pt = weights
    before = snapshot(tmp_path)
    r = run("fold", "mnist_mlp", "--weights", st.name, "-o", "./" + st.name, cwd=tmp_path)
    assert_bad_input(r, before, tmp_path, "is the input file .*--weights")
    r = run("export", "mnist_mlp", "--weights", st, "-o", st)
    assert_bad_input(r, before, tmp_path, "--weights")
    r = run("calibrate", "mnist_mlp", "--weights", pt, "--data", "digits", "-o", pt)
    assert_bad_input(r, before, tmp_path, "--weights")
    r = run("export", "mnist_mlp", "--weights", st, "-o", tmp_path / "x.onnx", "--report", st)
    assert_bad_input(r, before, tmp_path, "--weights")


def test_data_as_output_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    before = snapshot(tmp_path)
    r = run("train", "mnist_mlp", "--data", tmp_path / "d.npz", "-o", tmp_path / "d.npz")
    assert_bad_input(r, before, tmp_path)  # (a .npz is not a checkpoint suffix either)
    r = run("calibrate", "mnist_mlp", "--data", tmp_path / "d.npz", "-o", tmp_path / "d.pt")
    assert r.exit_code == 0, r.output  # a distinct path is fine...
    r = run("calibrate", "mnist_mlp", "--data", tmp_path / "d.npz", "-o", tmp_path / "d.pt",
            "--weights", tmp_path / "d.pt")
    assert_bad_input(r, match="--weights")  # ...the same one is not


@pytest.mark.parametrize("which", ["folded.onnx", "original.onnx"])
def test_run_into_the_inputs_folder_is_refused(tmp_path, which):
    d = tmp_path / "out"
    d.mkdir()
    save_external(small_model(c=16), d / which, which + ".data")
    before = snapshot(tmp_path)
    r = run("run", d / which, "-o", d, "--iters", "2")
    assert_bad_input(r, before, tmp_path, "is the input file")


def test_output_onto_the_inputs_external_data_is_refused(ext_model, tmp_path):
    before = snapshot(tmp_path)
    r = run("fold", ext_model, "-o", tmp_path / "m.onnx.data")
    assert_bad_input(r, before, tmp_path, "external data")
    onnx.checker.check_model(str(ext_model), full_check=True)


def test_an_inputs_data_file_shared_with_the_old_output_is_kept(tmp_path):
    """A model write removes the data files of the old output, but never one that another model in the folder
    (here the input) refers to: the fold goes ahead and the input keeps its data."""
    src = small_model(c=16)
    save_external(src, tmp_path / "out.onnx", "out.onnx.data")  # an existing output with its data...
    save_external(src, tmp_path / "in.onnx", "out.onnx.data")  # ...that the input shares
    data = (tmp_path / "out.onnx.data").read_bytes()
    r = run("fold", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    onnx.checker.check_model(str(tmp_path / "in.onnx"), full_check=True)
    assert count_bn(onnx.load(str(tmp_path / "out.onnx"))) < count_bn(onnx.load(str(tmp_path / "in.onnx")))


def test_hard_link_of_the_input_is_refused(model_path, tmp_path):
    os.link(model_path, tmp_path / "alias.onnx")
    before = snapshot(tmp_path)
    r = run("fold", model_path, "-o", tmp_path / "alias.onnx")
    assert_bad_input(r, before, tmp_path, "is the input file")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling_symlink", "folder"])
@pytest.mark.parametrize("option", ["-o", "--report"])
def test_special_targets_are_refused(model_path, tmp_path, kind, option):
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "precious.txt").write_text("keep me")
        target.symlink_to(tmp_path / "precious.txt")
    elif kind == "dangling_symlink":
        target.symlink_to(tmp_path / "nowhere.onnx")
    else:
        target.mkdir()
    args = ["-o", target, "--report", tmp_path / "r.json"] if option == "-o" else \
        ["-o", tmp_path / "out.onnx", "--report", target]
    before = snapshot(tmp_path)
    r = run("fold", model_path, *args)
    assert_bad_input(r, before, tmp_path, usage_ok=kind == "folder")  # click refuses a folder itself


def test_device_node_as_output_is_refused(model_path, tmp_path):
    # a device node made in tmp_path (never /dev/null itself: a regression would replace the system's)
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError, OSError):
        pytest.skip("cannot create a device node here (not root)")
    before = snapshot(tmp_path)
    r = run("fold", model_path, "-o", dev)
    assert_bad_input(r, before, tmp_path, "character device")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_unwritable_folder_is_refused_before_anything_is_written(model_path, tmp_path, option):
    # /sys refuses new files even to root; a chmod-ed folder is used as well when not root
    folders = [Path("/sys")] if os.path.isdir("/sys") else []
    if not IS_ROOT:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        folders.append(ro)
    if not folders:
        pytest.skip("no unwritable folder available")
    for folder in folders:
        args = ["-o", folder / "out.onnx"] if option == "-o" else \
            ["-o", tmp_path / "out.onnx", "--report", folder / "r.json"]
        before = snapshot(tmp_path)
        r = run("fold", model_path, *args)
        assert_bad_input(r, before, tmp_path, "not writable")
        assert not (tmp_path / "out.onnx").exists()


def test_bench_plot_onto_a_model_or_with_a_model_suffix_is_refused(model_path, tmp_path):
    before = snapshot(tmp_path)
    r = run("bench", model_path, "--plot", model_path, "--iters", "2")
    assert_bad_input(r, before, tmp_path, "is the input file")
    r = run("bench", model_path, "--plot", tmp_path / "x.onnx", "--iters", "2")
    assert_bad_input(r, before, tmp_path, "unsupported file type")


def test_in_place_is_the_one_exception(ext_model, tmp_path):
    r = run("fold", ext_model, "-o", ext_model, "--in-place")
    assert r.exit_code == 0, r.output
    assert count_bn(onnx.load(ext_model)) == 1
    names = sorted(os.listdir(tmp_path))  # the old m.onnx.data is gone, the new data has a fresh name
    assert len(names) == 2 and names[0] == "m.onnx" and re.fullmatch(r"m\.onnx\.[0-9a-f]{12}\.data", names[1])
    onnx.checker.check_model(str(ext_model), full_check=True)


# ------------------------------------------------------------------------------------------------ 4. bad input
def _ext_with(tmp_path, key, value):
    m = small_model(c=16)
    p = tmp_path / "m.onnx"
    save_external(m, p, "m.onnx.data")
    m = onnx.load(p, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.external_data)
    entry = next((e for e in t.external_data if e.key == key), None) or t.external_data.add(key=key)
    entry.value = value
    onnx.save(m, p)
    return p


@pytest.mark.parametrize("key,value", [("length", "-1"), ("length", "abc"), ("offset", "-4"), ("offset", "1.5"),
                                       ("location", "m.onnx.data\x00x")])
@pytest.mark.parametrize("command", ["inspect", "fold"])
def test_corrupt_external_data_fields_are_bad_input(tmp_path, key, value, command):
    p = _ext_with(tmp_path, key, value)
    before = snapshot(tmp_path)
    r = run(command, p, *(["-o", tmp_path / "out.onnx"] if command == "fold" else []))
    assert_bad_input(r, before, tmp_path, "corrupted")


@pytest.mark.parametrize("arrays,match", [
    (dict(x=np.float32(1.0)), "scalar"),
    (dict(x=np.array(["a", "b"])), "dtype"),
    (dict(x=np.zeros((2, 3, 8, 8), np.float32), y=np.array(["a", "b"])), "dtype"),
    (dict(x=np.zeros((2, 3, 8, 8), np.float32), y=np.array([0, -1])), "negative"),
    (dict(x=np.zeros((2, 3, 8, 8), np.float32), y=np.array([0.5, 1.0])), "non-integer"),
])
def test_bad_npz_is_bad_input(model_path, tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    before = snapshot(tmp_path)
    r = run("verify", model_path, model_path, "--data", tmp_path / "d.npz")
    assert_bad_input(r, before, tmp_path, match)


def test_negative_labels_in_training_are_bad_input(tmp_path):
    from bnfold.data import Dataset
    from bnfold.errors import BnfoldError
    from bnfold.train import prepare
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 64), np.float32), y=np.array([0, 1, -1, 2, 0, 1, 2, 3]))
    before = snapshot(tmp_path)
    r = run("train", "mnist_mlp", "--data", tmp_path / "d.npz", "-o", tmp_path / "c.safetensors")
    assert_bad_input(r, before, tmp_path, "negative")
    with pytest.raises(BnfoldError, match="negative"):  # the library checks Datasets built in code too
        prepare(Dataset({"x": np.zeros((2, 64), np.float32)}, np.array([0, -3]), "d"), (1, 64))


@pytest.mark.parametrize("config", ["[1, 2]", "\"text\"", "{not json"])
def test_checkpoint_config_that_is_not_an_object_is_bad_input(tmp_path, config):
    from safetensors.torch import save_file

    from bnfold.models import zoo
    state = {k: v.contiguous() for k, v in zoo.get("mnist_mlp").factory().state_dict().items()}
    save_file(state, tmp_path / "w.safetensors", metadata={"bnfold.config": config})
    before = snapshot(tmp_path)
    r = run("calibrate", "mnist_mlp", "--weights", tmp_path / "w.safetensors", "--data", "digits",
            "-o", tmp_path / "c.safetensors", "--max-batches", "2")
    assert_bad_input(r, before, tmp_path, "not a JSON object")


@pytest.mark.parametrize("args", [
    ["train", "mnist_mlp", "--batch-size", "0"], ["calibrate", "mnist_mlp", "--data", "digits", "--batch-size", "0"],
    ["train", "mnist_mlp", "--lr", "-1"], ["train", "mnist_mlp", "--lr", "0"], ["train", "mnist_mlp", "--epochs", "-1"],
    ["train", "mnist_mlp", "--epochs", "0"], ["demo", "--epochs", "0"],
])
def test_ranges_are_validated_by_the_command_line(tmp_path, args):
    before = snapshot(tmp_path)
    r = run(*args, "-o", tmp_path / ("out" if args[0] == "demo" else "c.safetensors"))
    assert r.exit_code == 2 and "Invalid value" in r.output, r.output
    assert snapshot(tmp_path) == before


def test_library_ranges(tmp_path):
    from bnfold.errors import BnfoldError
    from bnfold.train import batches, train
    for kw, match in [({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch size"), ({"lr": -1.0}, "learning rate"),
                      ({"lr": float("nan")}, "learning rate")]:
        with pytest.raises(BnfoldError, match=match):
            train("mnist_mlp", **kw)
    with pytest.raises(BnfoldError, match="batch size"):
        list(batches(np.zeros(4), 0))


@pytest.mark.parametrize("shape", ["99999999999999999999", "1x3x100000x100000", "64x64x64x64x64x64"])
def test_huge_input_shapes_are_bad_input(tmp_path, shape):
    before = snapshot(tmp_path)
    r = run("fold", "mnist_mlp", "--input-shape", shape, "-o", tmp_path / "f.onnx")
    assert_bad_input(r, before, tmp_path, "too large")


def test_unallocatable_input_shape_is_bad_input(monkeypatch):
    import torch

    from bnfold.errors import BnfoldError
    from bnfold.torch_io import InputSpec, example_inputs

    def refuse(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(torch, "randn", refuse)
    with pytest.raises(BnfoldError, match="cannot allocate an example input of shape 1x3x40000x40000"):
        example_inputs([InputSpec(None, (1, 3, 40000, 40000))], None)


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:7", "nonsense:0"])
def test_unusable_training_device_is_bad_input(tmp_path, device):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("a GPU is present")
    before = snapshot(tmp_path)
    r = run("train", "mnist_mlp", "--device", device, "--epochs", "1", "-o", tmp_path / "c.safetensors")
    assert_bad_input(r, before, tmp_path, "--device")


@pytest.mark.parametrize("body", ["def build():\n    raise SystemExit(0)\n",
                                  "import sys\nsys.exit(0)\ndef build():\n    pass\n",
                                  "def build():\n    raise SystemExit('bye')\n"])
def test_factory_calling_sys_exit_is_an_error(tmp_path, monkeypatch, body):
    (tmp_path / "exiting_factory.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("exiting_factory", None)
    before = snapshot(tmp_path)
    r = run("fold", "exiting_factory:build", "--random-weights", "--input-shape", "1x4", "-o", tmp_path / "f.onnx")
    assert_bad_input(r, {k: v for k, v in before.items()}, tmp_path, "sys.exit")


def _image_folder(tmp_path):
    from PIL import Image
    d = tmp_path / "imgs" / "cls"
    d.mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(d / "0.png")
    os.mkfifo(d / "1.png")  # a FIFO named like an image: opening it would block forever
    (d / "2.png").mkdir()  # a folder named like an image
    return tmp_path / "imgs"


def test_fifo_in_an_image_folder_is_never_opened(model_path, tmp_path):
    imgs = _image_folder(tmp_path)
    probe = "from bnfold.data import load_image_folder; import sys; print(len(load_image_folder(sys.argv[1], (8, 8))))"
    p = subprocess.run([sys.executable, "-c", probe, str(imgs)], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "1", p.stderr  # (in a child with a timeout: opening the FIFO would hang)
    exe = [sys.executable, "-m", "bnfold.cli.main"]
    p = subprocess.run([*exe, "verify", str(model_path), str(model_path), "--data", str(imgs)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "PASSED" in p.stderr + p.stdout


# ------------------------------------------------------------------------------------------------ 5. text is data
HOSTILE = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\",
           "[link=http://evil.example]click[/link]", "[/]", "[bold red]fake[/]", ":warning:", "a\nb\rc\x9bd",
           "tab|pipe<script>`tick`\u202egnp.exe"]


@pytest.fixture
def hostile_model(tmp_path):
    """A model whose BN names, node names and output name are terminal escape sequences and markup."""
    g = G(prefix="\x1b[31m")
    x = g.input("x", [1, 3, 8, 8])
    y = x
    for i, name in enumerate(HOSTILE[:-1]):
        y = g.bn(g.conv(y, 3, 3, pads=[1, 1, 1, 1], name=f"conv{i}"), 3, name=name)
    y = g.bn(g.node("Relu", [y]), 3, name=HOSTILE[-1])  # an unfoldable one: its name is in a skip row
    m = g.model([y])
    p = tmp_path / "h.onnx"
    onnx.save(m, p)
    return p


def _assert_no_escape(text: str):
    assert "\x1b" not in text and "\x9b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)


@pytest.mark.parametrize("command", ["inspect", "fold", "fold-json"])
def test_hostile_names_never_reach_the_terminal(hostile_model, tmp_path, command):
    args = [command.split("-")[0], hostile_model]
    if command.startswith("fold"):
        args += ["-o", tmp_path / "f[x].onnx", "--report", tmp_path / "r.json"]
    if command.endswith("json"):
        args += ["--json"]
    exe = [sys.executable, "-m", "bnfold.cli.main"]
    p = subprocess.run([*exe, *map(str, args)], capture_output=True, timeout=300,
                       env={**os.environ, "COLUMNS": "300", "TERM": "xterm-256color"})
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    out, err = p.stdout.decode(), p.stderr.decode()
    _assert_no_escape(out)
    _assert_no_escape(err)
    shown = out + err
    if not command.endswith("json"):
        assert "\\x1b]0;pwned\\x07" in shown and "[link=http://evil.example]click[/link]" in shown
        assert "[/]" in shown and "[bold red]fake[/]" in shown and ":warning:" in shown
    else:
        data = json.loads(out)
        assert {e["bn"] for e in data["entries"]} == set(HOSTILE)  # JSON keeps the names exactly
    if command.startswith("fold"):
        assert (tmp_path / "f[x].onnx").exists()
        if not command.endswith("json"):
            assert "-> " + str(tmp_path / "f[x].onnx") in shown  # the real output path, brackets included


def test_hostile_names_through_the_runner_and_the_table(hostile_model):
    r = run("inspect", hostile_model)
    assert r.exit_code == 0, r.output
    _assert_no_escape(r.output)
    assert "[/]" in r.output


def test_markup_in_paths_is_printed_literally(model_path, tmp_path):
    r = run("inspect", tmp_path / "[/]" / "no[x].onnx")
    assert_bad_input(r, match=re.escape("[/]/no[x].onnx: no such file"))
    r = run("fold", model_path, "-o", tmp_path / "[red]o[x].onnx")
    assert r.exit_code == 0 and "-> " + str(tmp_path / "[red]o[x].onnx") in r.output.replace("\n", "")


def test_internal_error_line_has_no_markup(model_path, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated bug with [/] and \x1b[2J")
    monkeypatch.setattr("bnfold.cli.main.fold_onnx_file", boom)
    r = run("fold", model_path, "-o", tmp_path / "f.onnx")
    assert r.exit_code == 3
    assert r.output.startswith("internal error: RuntimeError: simulated bug with [/] and \\x1b[2J"), r.output
    assert "[bold red]" not in r.output


def test_json_is_strict_with_non_finite_values(model_path, monkeypatch):
    from bnfold.fold import inspect_onnx_file as real

    def with_nan(*a, **k):
        report = real(*a, **k)
        report.extra["score"] = float("nan")
        report.extra["bounds"] = [float("-inf"), 1.0, float("inf")]
        return report
    monkeypatch.setattr("bnfold.cli.main.inspect_onnx_file", with_nan)
    r = run("inspect", model_path, "--json")
    assert r.exit_code == 0

    def refuse(name):
        raise ValueError(f"bare {name} in JSON output")
    data = json.loads(r.stdout, parse_constant=refuse)
    assert data["score"] is None and data["bounds"] == [None, 1.0, None]
    assert data["non_finite"] == ["/score", "/bounds/0", "/bounds/2"]


def test_verify_json_with_nan_outputs_is_strict(tmp_path):
    """A model whose outputs are NaN everywhere: the statistics are NaN, the JSON still parses strictly."""
    g = G()
    x = g.input("x", [2, 3])
    y = g.node("Sqrt", [g.node("Neg", [g.node("Abs", [x])])])  # sqrt(-|x|): NaN
    p = tmp_path / "nan.onnx"
    onnx.save(g.model([y]), p)
    r = run("verify", p, p, "--json")
    data = json.loads(r.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert r.exit_code in (0, 1) and "outputs" in data


def test_text_helpers():
    assert printable("a\x1b[2Jb\nc\x9b\u202e\x7f") == "a\\x1b[2Jb\\x0ac\\x9b\\u202e\\x7f"
    assert printable("ünïcode and 中文 stay") == "ünïcode and 中文 stay"
    assert markdown_text("a|b<c>[d](e)`f`_g") == "a\\|b\\<c\\>\\[d\\](e)\\`f\\`_g"
    assert json.loads(strict_json({"a": [float("nan"), 1]})) == {"a": [None, 1], "non_finite": ["/a/0"]}
    assert json.loads(strict_json({"a/b": float("inf")}))["non_finite"] == ["/a~1b"]


def test_report_md_escapes_names(hostile_model, tmp_path):
    out = tmp_path / "out"
    r = run("run", hostile_model, "-o", out, "--iters", "2")
    assert r.exit_code in (0, 1), r.output
    _assert_no_escape(r.output)
    md = (out / "report.md").read_text()
    _assert_no_escape(md)
    assert "tab\\|pipe\\<script\\>\\`tick\\`\\\\u202egnp.exe" in md  # a table cell that stays one cell
    assert "\\[link=http://evil.example\\]click\\[/link\\]" in md
    json.loads((out / "report.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_random_hostile_names(tmp_path):
    """Random node names built from control characters (C0, DEL, C1), escape sequences, rich markup, emoji
    codes and bidi overrides: inspect and fold exit 0, print no control character (newlines aside), and
    --json gives the names back exactly. BNFOLD_FUZZ_N sets the number of models (20 in CI)."""
    rng = np.random.default_rng(13)
    pieces = ([chr(c) for c in list(range(0, 32)) + [127] + list(range(128, 160))] +
              ["\x1b[31m", "\x1b]0;t\x07", "\x1b]8;;http://x\x1b\\", "\x1bP", "\x9b2J", "[", "]", "[/]",
               "[link=http://x]", "[bold]", ":smile:", "\u202e", "\u2066", "\u200b", "|", "`", "<b>",
               "a", "b", "é", "中", " ", "/", "\\"])
    n = int(os.environ.get("BNFOLD_FUZZ_N", 20))
    for trial in range(n):
        names = []
        while len(names) < 2:
            name = "".join(pieces[i] for i in rng.integers(0, len(pieces), rng.integers(1, 8)))
            if name not in names and "\x00" not in name:
                names.append(name)
        p = tmp_path / f"m{trial}.onnx"
        onnx.save(small_model(*names), p)
        r = run("inspect", p)
        assert r.exit_code == 0, (names, r.output)
        r2 = run("fold", p, "-o", tmp_path / f"f{trial}.onnx", "--report", tmp_path / f"r{trial}.json")
        assert r2.exit_code == 0, (names, r2.output)
        for text in (r.output, r2.output):
            bad = [c for c in text if c != "\n" and (ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u202e\u2066\u200b")]
            assert not bad, (names, bad)
        r3 = run("inspect", p, "--json")
        assert sorted(e["bn"] for e in json.loads(r3.stdout)["entries"]) == sorted(names)
