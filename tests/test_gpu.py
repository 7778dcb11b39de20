"""GPU paths: verify and bench on ONNX Runtime's CUDA provider, PyTorch on CUDA. Skipped cleanly where no GPU
provider really runs (the onnxruntime-gpu wheel lists CUDA even where it cannot load)."""

from __future__ import annotations

import onnx
import pytest
import torch

from bnfold import fold_model
from bnfold.bench import bench
from bnfold.export import export_onnx
from bnfold.models import zoo
from bnfold.runtime import provider_works
from bnfold.verify import verify

cuda_ort = pytest.mark.skipif(not provider_works("cuda"), reason="ONNX Runtime's CUDA provider does not run here")
cuda_torch = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for PyTorch")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    model = zoo.randomize_bn(zoo.create("small_resnet")).eval()
    original = export_onnx(model, (torch.randn(2, 3, 32, 32),))
    onnx.save(original, d / "o.onnx")
    onnx.save(fold_model(original)[0], d / "f.onnx")
    return d


@cuda_ort
def test_verify_and_bench_on_cuda(pair):
    result = verify(pair / "o.onnx", pair / "f.onnx", ep="cuda")
    assert result.passed and result.providers["candidate"][0] == "CUDAExecutionProvider"
    run = bench([pair / "o.onnx", pair / "f.onnx"], eps=("cuda",), opt_levels=("off", "all"), iters=20, warmup=3)
    assert all(r.providers[0] == "CUDAExecutionProvider" and r.io_binding for r in run.results)
    graph = bench([pair / "f.onnx"], eps=("cuda",), iters=20, warmup=3, cuda_graph=True)
    assert graph.results[0].cuda_graph


@cuda_torch
def test_torch_bench_on_cuda():
    from bnfold.bench import Setting, TorchRunner
    model = zoo.create("small_resnet").eval()
    r = TorchRunner(model, "m", Setting("cuda", "eager", 2), (1, 3, 32, 32))
    assert r() > 0 and next(model.parameters()).device.type == "cpu"  # the caller's module stays put
