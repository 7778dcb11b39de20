"""Population statistics exactly as Algorithm 2, against closed-form computations; distributed equals single;
dropout off; restore; and the train -> calibrate -> fold -> export -> verify path end to end."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold import fold_model
from bnfold.calibrate import population_statistics
from bnfold.cli.main import main
from bnfold.export import export_onnx
from bnfold.train import read_checkpoint_config, save_checkpoint, train
from bnfold.verify import verify


def mlp():
    """float64 so that the closed form (also float64) can be matched to 1e-10."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 4),
                         nn.BatchNorm1d(4)).double()


def reference_stats(model, xs, *, pooled=False):
    """Closed form: run the layers by hand, BN normalising with batch statistics (float64), dropout off."""
    m = {k: v.double() for k, v in model.state_dict().items()}
    per_bn = {"1": [], "5": []}
    for x in xs:
        h = x.double() @ m["0.weight"].T + m["0.bias"]
        per_bn["1"].append(h)
        mu, var = h.mean(0), h.var(0, unbiased=False)
        h = (h - mu) / torch.sqrt(var + 1e-5) * m["1.weight"] + m["1.bias"]
        h = torch.relu(h) @ m["4.weight"].T + m["4.bias"]
        per_bn["5"].append(h)
    out = {}
    for k, hs in per_bn.items():
        counts = np.array([len(h) for h in hs], np.float64)
        mus = np.stack([h.mean(0).numpy() for h in hs])
        vars_ = np.stack([h.var(0, unbiased=False).numpy() for h in hs])
        if pooled:
            allh = torch.cat(hs).numpy()
            out[k] = (allh.mean(0), allh.var(0, ddof=1))
        elif len(set(counts)) == 1:  # Algorithm 2 verbatim: mean of means, m/(m-1) x mean of variances
            mcount = counts[0]
            out[k] = (mus.mean(0), mcount / (mcount - 1) * vars_.mean(0))
        else:  # weighted by batch size
            w = counts[:, None]
            out[k] = ((w * mus).sum(0) / w.sum(), (w * (w / (w - 1)) * vars_).sum(0) / w.sum())
    return out


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [16, 16, 16, 5]], ids=["equal", "final_smaller"])
def test_linear_matches_closed_form(sizes):
    model = mlp().eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]
    expected = reference_stats(model, xs)
    result = population_statistics(model, xs)
    assert result.batches == len(sizes) and result.samples == sum(sizes)
    for name in ("1", "5"):
        bn = model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.numpy(), expected[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bn.running_var.numpy(), expected[name][1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.stats[name][0].numpy(), expected[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.stats[name][1].numpy(), expected[name][1], rtol=1e-10, atol=1e-12)
    assert not model.training and not model[1].training and not model[3].training  # modes restored


def test_pooled_variance_option():
    model = mlp().eval()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (10, 10, 7)]
    expected = reference_stats(model, xs, pooled=True)
    result = population_statistics(model, xs, pooled=True)
    for name in ("1", "5"):
        np.testing.assert_allclose(result.stats[name][1].numpy(), expected[name][1], rtol=1e-9)
    assert result.method == "pooled"


def test_conv_counts_n_h_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    result = population_statistics(model, xs)
    hs = [model[0](x).detach().double() for x in xs]
    m = 4 * 5 * 5
    mus = torch.stack([h.mean((0, 2, 3)) for h in hs]).mean(0)
    var = m / (m - 1) * torch.stack([h.var((0, 2, 3), unbiased=False) for h in hs]).mean(0)
    np.testing.assert_allclose(result.stats["1"][0].numpy(), mus.numpy(), rtol=1e-10)
    np.testing.assert_allclose(result.stats["1"][1].numpy(), var.numpy(), rtol=1e-10)
    assert result.per_bn_values["1"] == 3 * m


def test_dropout_is_off_and_result_is_deterministic():
    model = mlp().eval()
    xs = [torch.randn(16, 6, dtype=torch.float64) for _ in range(3)]
    a = population_statistics(model, xs, apply=False)
    b = population_statistics(model, xs, apply=False)
    for name in a.stats:
        assert torch.equal(a.stats[name][1], b.stats[name][1])
    expected = reference_stats(model, xs)  # computed without dropout
    np.testing.assert_allclose(a.stats["5"][1].numpy(), expected["5"][1], rtol=1e-10)


def test_restore_and_batch_cap():
    model = mlp().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = [torch.randn(8, 6, dtype=torch.float64) for _ in range(5)]
    result = population_statistics(model, xs, max_batches=2)
    assert result.batches == 2
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    result.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = mlp().eval()
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (16, 16, 16, 9)]
        mine = xs[rank::world]  # each process calibrates on its share of the batches
        result = population_statistics(model, mine)
        if rank == 0:
            torch.save({k: (m, v) for k, (m, v) in result.stats.items()} | {"_meta": result.summary()}, out)
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "dist.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    dist_stats = torch.load(out, weights_only=True)
    assert dist_stats["_meta"]["world_size"] == 2 and dist_stats["_meta"]["batches"] == 4
    model = mlp().eval()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (16, 16, 16, 9)]
    single = population_statistics(model, xs)
    for name, (mean, var) in single.stats.items():
        torch.testing.assert_close(dist_stats[name][0], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dist_stats[name][1], var, rtol=1e-12, atol=1e-12)


def test_train_calibrate_fold_export_verify_end_to_end(tmp_path):
    result = train("mnist_mlp", epochs=3, lr=0.1)
    assert result.test_accuracy > 0.85 and result.calibration.method == "algorithm2"
    ckpt = save_checkpoint(result.model, tmp_path / "m.safetensors", result.config)
    assert read_checkpoint_config(ckpt)["model"] == "mnist_mlp"
    exported = export_onnx(result.model, (torch.zeros(2, 64),))
    folded, report = fold_model(exported)
    assert report.folded == 3
    from bnfold.data import load_digits
    v = verify(exported, folded, data=load_digits())
    assert v.passed and v.accuracy["delta"] == 0 and v.accuracy["reference"] > 0.85


def test_cli_train_and_calibrate(tmp_path):
    ck = tmp_path / "m.pt"
    r = CliRunner().invoke(main, ["train", "mnist_mlp", "--epochs", "2", "-o", str(ck), "-q"])
    assert r.exit_code == 0, r.output
    assert "TRAINED | mnist_mlp" in r.output
    obj = torch.load(ck, weights_only=True)  # no pickle needed
    assert json.loads(obj["bnfold"])["calibration"]["method"] == "algorithm2"
    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(main, ["calibrate", "mnist_mlp", "--weights", str(ck), "--data", "digits", "--pooled",
                                  "--max-batches", "5", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)
    assert cal["method"] == "pooled" and cal["batches"] == 5
    assert read_checkpoint_config(out)["calibration"]["method"] == "pooled"
    r = CliRunner().invoke(main, ["train", "no_such_model", "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and r.output.startswith("error:")


def test_apply_false_leaves_the_model_untouched():
    model = mlp().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    population_statistics(model, [torch.randn(8, 6, dtype=torch.float64) for _ in range(3)], apply=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_batchnorm_called_twice_counts_both_calls():
    bn = nn.BatchNorm1d(3).double().eval()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return self.bn(x) + self.bn(10 * x + 5)
    x = torch.randn(16, 3, dtype=torch.float64)
    result = population_statistics(Twice().eval(), [x])
    both = torch.cat([x, 10 * x + 5])
    torch.testing.assert_close(result.stats["bn"][0], both.mean(0))
    assert result.per_bn_values["bn"] == 32


def test_train_refuses_channels_last_data_instead_of_reshaping():
    """(N, H, W, C) samples for a (C, H, W) model have the right element count but the wrong layout: training
    must refuse them (as verify and calibrate do), not reshape them into scrambled images."""
    from bnfold.data import Dataset
    from bnfold.errors import BnfoldError
    from bnfold.train import prepare

    rng = np.random.default_rng(0)
    labels = np.arange(6) % 2
    nhwc = Dataset({"x": rng.standard_normal((6, 8, 8, 3)).astype(np.float32)}, labels, "nhwc")
    with pytest.raises(BnfoldError, match="--layout nhwc"):
        prepare(nhwc, (1, 3, 8, 8))
    x, _ = prepare(nhwc, (1, 3, 8, 8), layout="nhwc")  # said explicitly: channels move to axis 1
    assert torch.equal(x, torch.from_numpy(nhwc.inputs["x"]).permute(0, 3, 1, 2))
    flat = Dataset({"x": rng.standard_normal((6, 3 * 8 * 8)).astype(np.float32)}, labels, "flat")
    x, y = prepare(flat, (1, 3, 8, 8))  # flat samples are still reshaped
    assert tuple(x.shape) == (6, 3, 8, 8) and torch.equal(x.reshape(6, -1), torch.from_numpy(flat.inputs["x"]))
    assert y.tolist() == labels.tolist()
