"""Issue 22, a new user's first hour, as a user runs it: weights never silent (and recorded), the README's
step-by-step model can fail verify, one provider policy, one meaning of `--data digits`, errors that point at
the fix, output legible at 80 columns."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli.main import main
from bnfold.runtime import provider_works

from .helpers import G

SPEC = "tests.test_first_hour:tiny"
NARROW = {"COLUMNS": "80"}


def tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.strip()]


def metadata(path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def image_onnx(tmp_path_factory):
    """Conv+BN with long node names, input (N, 3, 8, 8)."""
    g = G(seed=1)
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 4, name="encoder.stage_four.residual_block_three.conv_unit.convolution_one")
    y = g.bn(y, 4, name="encoder.stage_four.residual_block_three.conv_unit.batch_normalization_one")
    y = g.node("GlobalAveragePool", [y])
    y = g.node("Flatten", [y], name="the_classifier_output_probabilities_logits_flattened")
    p = tmp_path_factory.mktemp("img") / "model.onnx"
    onnx.save(g.model([y]), p)
    return p


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """Gemm+BN taking the flat digits, (N, 64) -> 10 classes."""
    g = G(seed=2)
    x = g.input("x", ["N", 64])
    y = g.node("Gemm", [x, g.const(g.rand(10, 64, scale=0.3)), g.const(g.rand(10))], transB=1)
    y = g.bn(y, 10)
    p = tmp_path_factory.mktemp("dig") / "digits.onnx"
    onnx.save(g.model([y]), p)
    return p


# ------------------------------------------------------------------------------------------------ 1. weights
@pytest.mark.parametrize("command", ["fold", "export", "run", "verify", "calibrate"])
def test_spec_without_weights_exits_2_naming_both_choices(tmp_path, command):
    out = tmp_path / "out"
    args = {"fold": ["fold", SPEC, "--input-shape", "1x3x8x8", "-o", out / "f.onnx"],
            "export": ["export", SPEC, "--input-shape", "1x3x8x8", "-o", out / "f.onnx"],
            "run": ["run", SPEC, "--input-shape", "1x3x8x8", "-o", out],
            "verify": ["verify", SPEC, tmp_path / "c.onnx", "--input-shape", "1x3x8x8"],
            "calibrate": ["calibrate", SPEC, "--data", "digits", "-o", out / "c.safetensors"]}[command]
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert len(lines_of(r.output)) == 1 and r.output.startswith("error:"), r.output
    assert "--weights" in r.output and "--random-weights" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_random_weights_on_purpose_and_provenance_recorded(tmp_path):
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    r = cli("fold", SPEC, "--random-weights", "--input-shape", "1x3x8x8", "-o", out, "--report", rep, "--json")
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    meta = metadata(out)
    # the metadata summary counts what the command printed (the module-level fold, not only the ONNX pass)
    assert (meta["bnfold"]["bn_total"], meta["bnfold"]["folded"]) == (printed["bn_total"], printed["folded"]) == (1, 1)
    prov = meta["bnfold.provenance"]
    assert prov["model"] == SPEC and prov["weights"] == "random, seed 0" and prov["bnfold"]
    assert "identity" in prov["statistics"]
    assert json.loads(rep.read_text())["provenance"] == prov == printed["provenance"]


def test_weights_file_sha256_recorded(tmp_path):
    from safetensors.torch import save_file

    m = tiny()
    nn.init.uniform_(m[1].running_var, 0.5, 2.0)
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    sha = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    r = cli("export", SPEC, "--weights", tmp_path / "w.safetensors", "--input-shape", "1x3x8x8", "--no-fold",
            "-o", tmp_path / "e.onnx", "-q")
    assert r.exit_code == 0, r.output
    prov = metadata(tmp_path / "e.onnx")["bnfold.provenance"]
    assert prov["weights_sha256"] == sha and prov["weights_file"].endswith("w.safetensors")
    assert sha in prov["weights"]
    r = cli("verify", tmp_path / "e.onnx", tmp_path / "e.onnx", "--json")  # verify's report says what it compared
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["provenance"]["reference"]["weights_sha256"] == sha


def test_weights_given_with_an_onnx_model_is_refused_not_ignored(image_onnx, full_checkpoint, tmp_path):
    r = cli("fold", image_onnx, "--weights", full_checkpoint, "-o", tmp_path / "f.onnx")
    assert r.exit_code == 2 and "ONNX model" in r.output and "drop the option" in r.output, r.output
    assert not (tmp_path / "f.onnx").exists()


def test_zoo_default_weights_are_said_on_stderr_and_not_identity(tmp_path):
    r = cli("export", "mlp_bn", "--no-fold", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    assert "no --weights given" in r.stderr and "zoo's own weights" in r.stderr and "not trained" in r.stderr
    assert "zoo's own weights" not in r.stdout
    assert "randomized" in metadata(tmp_path / "m.onnx")["bnfold.provenance"]["weights"]


# ------------------------------------------------------------------------------------------------ 2. README model
def _drop_batchnorms(model: onnx.ModelProto) -> onnx.ModelProto:
    """A 'fold' that forgets every BN: each BatchNormalization's output is its input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rename = {}
    keep = []
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            rename[n.output[0]] = rename.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    for o in m.graph.output:
        o.name = rename.get(o.name, o.name)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_readme_step_by_step_model_fails_verify_when_every_bn_is_dropped(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    export_line = re.search(r"^bnfold export small_resnet --no-fold -o small_resnet.onnx$", readme, re.M)
    assert export_line and re.search(r"^bnfold verify small_resnet.onnx small_resnet_folded.onnx", readme, re.M)
    r = cli("export", "small_resnet", "--no-fold", "-o", tmp_path / "small_resnet.onnx", "-q")
    assert r.exit_code == 0, r.output
    broken = _drop_batchnorms(onnx.load(str(tmp_path / "small_resnet.onnx")))
    assert not any(n.op_type == "BatchNormalization" for n in broken.graph.node)
    onnx.save(broken, tmp_path / "broken.onnx")
    r = cli("verify", tmp_path / "small_resnet.onnx", tmp_path / "broken.onnx")
    assert r.exit_code == 1 and lines_of(r.output)[-1].startswith("FAILED"), r.output


# ------------------------------------------------------------------------------------------------ 4. providers, digits
@pytest.mark.skipif(provider_works("cuda"), reason="CUDA really runs here")
def test_run_with_an_unavailable_provider_exits_2_naming_it(image_onnx, tmp_path):
    r = cli("run", image_onnx, "-o", tmp_path / "out", "--ep", "cpu,cuda", "--iters", "2")
    assert r.exit_code == 2 and r.output.startswith("error:") and "cuda" in r.output and "--ep auto" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(provider_works("cuda"), reason="CUDA really runs here")
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_ep_auto_takes_what_runs_and_the_verdict_names_what_was_skipped(image_onnx, command):
    if command == "verify":
        r = cli("verify", image_onnx, image_onnx, "--ep", "auto")
        head = "PASSED"
    else:
        r = cli("bench", image_onnx, "--ep", "auto", "--iters", "3", "--warmup", "0", "--session-time", "0")
        head = "DONE"
    assert r.exit_code == 0, r.output
    verdict = lines_of(r.output)[-1]
    assert verdict.startswith(head) and "skipped cuda" in verdict, verdict


def test_digits_means_the_held_out_split_train_reports(digits_onnx, tmp_path):
    r = cli("verify", digits_onnx, digits_onnx, "--data", "digits", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["samples"] == 359 and "held-out" in res["inputs"]
    r = cli("verify", digits_onnx, digits_onnx, "--data", "digits:all", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["samples"] == 1797 and "all" in res["inputs"]
    # train holds out exactly that split: its test indices are the ones verify reads
    from bnfold.data import load_digits
    from bnfold.train import split
    full, held = load_digits("all"), load_digits("test")
    np.testing.assert_array_equal(full.inputs["x"][split(1797, 0.2, seed=5)[1]], held.inputs["x"])


def test_calibrate_digits_is_the_training_split(tmp_path):
    from bnfold.train import read_checkpoint_config

    r = cli("calibrate", "mnist_mlp", "--data", "digits", "-o", tmp_path / "c.safetensors", "-q")
    assert r.exit_code == 0, r.output
    cal = read_checkpoint_config(tmp_path / "c.safetensors")["calibration"]
    assert cal["samples"] == 1438 and cal["data"].startswith("digits:train")


# ------------------------------------------------------------------------------------------------ 5. errors
@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    from bnfold.models import zoo
    p = tmp_path_factory.mktemp("ck") / "resnet_full.pt"
    torch.save({"model": tiny(), "note": object.__new__(zoo.ZooEntry)}, p)  # a full pickle
    return p


def test_torch_checkpoint_as_model_points_at_spec_weights(full_checkpoint, tmp_path):
    r = cli("fold", full_checkpoint, "-o", tmp_path / "y.onnx")
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert "PyTorch checkpoint" in r.output and "--weights" in r.output and "protobuf" not in r.output
    assert not (tmp_path / "y.onnx").exists()


def test_onnx_file_given_to_calibrate_says_it_needs_pytorch(image_onnx, tmp_path):
    r = cli("calibrate", image_onnx, "--data", "digits", "-o", tmp_path / "c.pt")
    assert r.exit_code == 2 and len(lines_of(r.output)) == 1, r.output
    assert "calibrate needs the PyTorch model" in r.output and "neither" not in r.output


def test_wrong_channel_count_is_one_line(tmp_path):
    r = cli("fold", "bn_head", "--input-shape", "1x4x16x16", "-o", tmp_path / "f.onnx")
    assert r.exit_code == 2, r.output
    lines = lines_of(r.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and "1x4x16x16" in lines[0], r.output
    assert "RuntimeError:" not in r.output and "Traceback" not in r.output and "nn_module_stack" not in r.output


def test_escape_codes_of_library_messages_are_stripped(full_checkpoint, tmp_path):
    r = cli("fold", SPEC, "--weights", full_checkpoint, "--input-shape", "1x3x8x8", "-o", tmp_path / "f.onnx")
    assert r.exit_code == 2 and "--trust-pickle" in r.output
    assert "\x1b" not in r.output and "\\x1b" not in r.output and "[1m" not in r.output, r.output


# ------------------------------------------------------------------------------------------------ 6. 80 columns
def test_long_names_are_shortened_not_wrapped_at_80_columns(image_onnx):
    r = cli("inspect", image_onnx, env=NARROW)
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if "backward" in ln]
    assert len(rows) == 1 and "…" in rows[0] and rows[0].lstrip("│ ").startswith("encoder."), r.output
    assert all(len(ln) <= 80 for ln in r.output.splitlines()[:-1]), r.output  # the verdict line may be longer


def test_verify_numbers_are_never_cut_at_80_columns(image_onnx):
    r = cli("verify", image_onnx, image_onnx, env=NARROW)
    assert r.exit_code == 0, r.output
    table = [ln for ln in r.output.splitlines() if not ln.startswith("PASSED")]
    row = next(ln for ln in table if "the_class" in ln)
    assert "…" in row and row.split()[-3] == "1.000000" and all(len(ln) <= 80 for ln in table), r.output


def test_torch_runtime_footer_names_torch():
    r = cli("bench", "mlp_bn", "--runtime", "torch", "--iters", "2", "--warmup", "0", "--session-time", "0",
            env=NARROW)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"torch {torch.__version__}" in text and "ORT " not in text, r.output


def test_help_texts_are_complete_and_unescaped():
    import click

    missing = [f"{name} {p.opts[0]}" for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []
    for name in main.commands:
        r = cli(name, "--help")
        assert r.exit_code == 0 and "%%" not in r.output, (name, r.output)
