"""The reader/writer (bnfold.protofile): a fold of a file gives the bytes that loading the model whole, folding it and
saving it with onnx gives; tensors stay in the file until read; a crash leaves the old or the new model."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import protofile
from bnfold import provenance as prov_mod
from bnfold.errors import BnfoldError
from bnfold.fold import fold_onnx_file, inspect_onnx_file
from bnfold.onnx_fold import FoldOptions, fold_model
from bnfold.onnx_io import load_model, save_model
from bnfold.rules.base import Param

from .helpers import G, crash_in_child, random_feeds, run_ort


@pytest.fixture(autouse=True)
def _index_small_files(monkeypatch):
    """The test models are small: index them anyway (by default a file under 4 MiB is parsed whole)."""
    monkeypatch.setattr(protofile, "INDEX_MIN_FILE", 0)

DATA_RE = re.compile(r"\.[0-9a-f]{12}\.data$")


# ------------------------------------------------------------------------------------------------ the corpus
def conv_chain(dtype=np.float32, n=3, c=32):
    g = G(dtype=dtype)
    y = g.input("x", [1, 8, 12, 12])
    for i in range(n):
        y = g.bn(g.conv(y, 8 if i == 0 else c, c, bias=i % 2 == 0), c)
    return g.model([g.node("Relu", [y])])


def gemm_matmul():
    g = G()
    x = g.input("x", [4, 64])
    y = g.node("Gemm", [x, g.const(g.rand(64, 64)), g.const(g.rand(64))], transB=1)
    y = g.bn(y, 64)
    y = g.bn(g.node("MatMul", [y, g.const(g.rand(64, 48))]), 48)
    return g.model([y])


def with_subgraph():
    """BNs in the main graph and in both branches of an If, each branch with its own large initializers."""
    g = G()
    x = g.input("x", [1, 16, 8, 8])
    cond = g.input("cond", [], dtype=None)
    g.inputs[-1].type.tensor_type.elem_type = TensorProto.BOOL
    y = g.bn(g.conv(x, 16, 16), 16)
    branches = []
    for k in range(2):
        b = G(seed=k + 1, prefix=f"b{k}_")
        z = b.bn(b.conv(y, 16, 16), 16)
        out = helper.make_tensor_value_info(z, TensorProto.FLOAT, None)
        branches.append(helper.make_graph(b.nodes, f"branch{k}", [], [out], initializer=b.inits))
    r = g.node("If", [cond], then_branch=branches[0], else_branch=branches[1])
    return g.model([r], out_shapes=[[1, 16, 4, 4]])


def legacy_ir3():
    """IR 3: initializers are listed as graph inputs too (rewritten and removed with them)."""
    m = conv_chain(n=2)
    m.ir_version = 3
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    return m


def decorated():
    """Doc strings and metadata on tensors, nodes and the model; a large int64 initializer (never a reference:
    shape inference may read it); a model that already carries bnfold metadata."""
    m = conv_chain(n=2, c=48)
    for t in m.graph.initializer:
        t.doc_string = f"doc of {t.name}"
        t.metadata_props.add(key="origin", value=t.name)
    m.graph.doc_string = "graph doc"
    m.doc_string = "model doc"
    m.producer_name = "tests"
    m.metadata_props.add(key="bnfold", value="{}")
    big = numpy_helper.from_array(np.arange(2048, dtype=np.int64), "ints")
    m.graph.initializer.append(big)
    return m


MODELS = {
    "conv_chain": conv_chain,
    "conv_chain_f16": lambda: conv_chain(np.float16),
    "gemm_matmul": gemm_matmul,
    "subgraph": with_subgraph,
    "ir3": legacy_ir3,
    "decorated": decorated,
}


def legacy_fold(src: Path, out_dir: Path, options=None) -> Path:
    """What bnfold did before the reader/writer: load the whole model, fold it, save it with onnx."""
    loaded = load_model(src)
    folded, _ = fold_model(loaded.model, options, inplace=True, name=str(src))
    prov_mod.record(folded, prov_mod.provenance(str(src)))  # fold_onnx_file records the input's provenance
    dst = out_dir / "legacy.onnx"
    save_model(folded, dst, external_data=loaded.external_data, copy=False)
    return dst


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("options", [None, FoldOptions(lower_standalone=True, forward=False)], ids=["default", "lower"])
def test_fold_is_byte_identical_to_loading_the_model_whole(tmp_path, name, options):
    m = MODELS[name]()
    onnx.checker.check_model(m, full_check=True)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    with load_model(src, skeleton=True) as loaded:  # the index really is used: large tensors are references
        assert loaded.source is not None and loaded.source.refs
        assert loaded.model.ByteSize() < src.stat().st_size / 4
    new = tmp_path / "new.onnx"
    report = fold_onnx_file(src, new, options)
    old = legacy_fold(src, tmp_path, options)
    assert sha(new) == sha(old), name
    assert report.folded > 0
    onnx.checker.check_model(str(new), full_check=True)
    assert inspect_onnx_file(src, options).to_dict() == fold_onnx_file(src, None, options, dry_run=True).to_dict()


@pytest.mark.parametrize("name", ["conv_chain", "subgraph", "decorated"])
def test_external_data_output_is_identical_in_content(tmp_path, name):
    """A model with external data: the model file is the same but for the data file's (fresh, random) name,
    and the data files are byte-identical (same tensors, same order, same offsets)."""
    m = MODELS[name]()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(m)  # onnx.save_model moves tensors to external data in place
    onnx.save_model(on_disk, src_dir / "m.onnx", save_as_external_data=True, location="weights.bin",
                    size_threshold=512)
    new = tmp_path / "new.onnx"
    fold_onnx_file(src_dir / "m.onnx", new)
    old = legacy_fold(src_dir / "m.onnx", tmp_path)

    got, want = _parts(new), _parts(old)
    assert got[1] is not None and want[1] is not None  # one data file each
    assert got == want
    full = onnx.load(str(new))
    feeds = random_feeds(m)
    ref = run_ort(m, feeds)
    for a, b in zip(run_ort(full, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ computed tensors
def wide_chain(dtype=np.float32, n=3, c=96):
    """Conv+BN pairs whose weights (c*c*9 values, over 64 KiB) are read from the file when the fold needs them,
    and rewritten in place."""
    g = G(dtype=dtype)
    y = g.input("x", [1, c, 8, 8])
    for i in range(n):
        y = g.bn(g.conv(y, c, c, bias=i == 1), c)
    return g.model([y])


def _save(m: onnx.ModelProto, folder: Path, external: bool) -> Path:
    folder.mkdir()
    path = folder / "m.onnx"
    if external:
        on_disk = onnx.ModelProto()
        on_disk.CopyFrom(m)
        onnx.save_model(on_disk, path, save_as_external_data=True, location="weights.bin", size_threshold=512)
    else:
        onnx.save(m, path)
    return path


def _parts(p: Path) -> tuple[bytes, bytes | None]:
    """A written model file with its data file's fresh, random name replaced by DATA; and the data file's bytes."""
    model = onnx.load(str(p), load_external_data=False)
    names = set()
    for t in protofile.iter_model_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                names.add(e.value)
                e.value = "DATA"
    data = [f for f in os.listdir(p.parent) if f.startswith(p.name + ".") and f.endswith(".data")]
    assert len(names) == len(data) <= 1 and all(DATA_RE.search(n) for n in names)
    return model.SerializeToString(), (p.parent / data[0]).read_bytes() if data else None


class _Evaluations:
    """Counts the recipes evaluated (:class:`protofile.Computed`, whole or in blocks) and, at each array or
    block computed, how many that earlier ones returned are still alive."""

    def __init__(self, monkeypatch):
        import weakref

        self.count, self.blocks, self.most_alive, self._returned = 0, 0, 0, []
        real_call, real_pieces = protofile.Computed.__call__, protofile.Computed.pieces

        def seen(arr):
            self.most_alive = max(self.most_alive, sum(r() is not None for r in self._returned))
            self._returned.append(weakref.ref(arr))

        def call(comp):
            arr = real_call(comp)
            if comp.fresh:
                self.count += 1
                seen(arr)
            return arr

        def pieces(comp):
            if comp.blocks is not None:
                self.count += 1
            for b in real_pieces(comp):
                if comp.blocks is not None:
                    self.blocks += 1
                    seen(b)
                yield b
        monkeypatch.setattr(protofile.Computed, "__call__", call)
        monkeypatch.setattr(protofile.Computed, "pieces", pieces)


@pytest.mark.parametrize("block", [1 << 20, 4096], ids=["whole", "blocks"])
@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_fp16_weights_are_computed_when_written_with_the_same_bytes(tmp_path, monkeypatch, external, block):
    """An fp16 model, embedded or with external data: every folded weight is a recipe evaluated by the writer
    (one at a time; in blocks of rows when they are larger than a block), and the output is the one that
    folding the whole loaded model gives (byte for byte; with external data the same model file but for the
    data file's fresh name, and the same data file)."""
    m = wide_chain(np.float16)
    src = _save(m, tmp_path / "src", external)
    with load_model(src, skeleton=True) as loaded:
        assert loaded.source is not None and loaded.source.refs
    monkeypatch.setattr(protofile, "BLOCK_BYTES", block)
    seen = _Evaluations(monkeypatch)
    new = tmp_path / "new.onnx"
    report = fold_onnx_file(src, new)
    # 96 rows of 96*9 fp16 values (1,728 bytes): one block of 1 MiB, or 48 blocks of 2 rows (4,096 bytes)
    assert report.folded == 3 and seen.count == 3 and seen.blocks == 3 * (1 if block > 1e5 else 48)
    assert seen.most_alive <= 1  # the block being written while the next is computed
    monkeypatch.undo()
    old = legacy_fold(src, tmp_path)
    if external:
        assert _parts(new) == _parts(old) and _parts(new)[1] is not None
    else:
        assert sha(new) == sha(old)
    onnx.checker.check_model(str(new), full_check=True)
    # numbers: each weight is the float64 product rounded once to fp16 (numpy's direct, correctly rounded cast)
    out = onnx.load(str(new))
    assert [n.op_type for n in out.graph.node] == ["Conv"] * 3
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    folded = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for conv, bn in zip(m.graph.node[0::2], m.graph.node[1::2]):
        gamma, _, _, var = (inits[i].astype(np.float64) for i in bn.input[1:])
        scale = gamma / np.sqrt(var + 1e-5)
        want = (inits[conv.input[1]].astype(np.float64) * scale[:, None, None, None]).astype(np.float16)
        np.testing.assert_array_equal(folded[conv.input[1]], want)


@pytest.mark.parametrize("factor_shape", [(32, 1, 1, 1), (1, 24, 1, 1), (24, 1, 1), (), (32, 24, 1, 1)],
                         ids=["rows", "columns", "trailing", "scalar", "grouped"])
@pytest.mark.parametrize("stored", [False, True], ids=["loader", "stored"])
def test_a_weight_computed_in_blocks_is_the_weight_computed_whole(tmp_path, monkeypatch, factor_shape, stored):
    """The blocks of rows of a folded weight (factor per output channel, per input channel, scalar, or one
    per element of the first two axes as for a grouped ConvTranspose) are, end to end, the whole weight's
    bytes; the loader reads only each block's rows from the file."""
    g = G()
    w = g.rand(32, 24, 3, 3)
    m = g.model([g.node("Conv", [g.input("x", [1, 24, 5, 5]), g.const(w, "w")])])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    monkeypatch.setattr(protofile, "BLOCK_BYTES", 5 * 24 * 9 * 4)  # 5 rows: blocks of 5, the last of 2
    factor = np.random.default_rng(0).uniform(-3, 3, factor_shape)
    with load_model(src, skeleton=True) as loaded:
        t = loaded.model.graph.initializer[0]
        loader = protofile.tensor_loader(t)
        assert loader is not None and loader.rows(30, 40).shape == (2, 24, 3, 3)
        p = Param(np.dtype(np.float32), stored=w if stored else None, factor=factor, loader=loader,
                  stored_shape=w.shape, detached=True)
        comp = p.recipe("w")
        pieces = list(comp.pieces())
        assert [len(b) for b in pieces] == [5] * 6 + [2]
        assert b"".join(b.tobytes() for b in pieces) == comp().tobytes() == (w * factor).astype(np.float32).tobytes()
        reads = []
        monkeypatch.setattr(loaded.source, "data", lambda ref, start=0, n=None: reads.append(n) or
                            protofile.Source.data(loaded.source, ref, start, n))
        list(comp.pieces())
        assert reads == ([] if stored else [5 * 24 * 9 * 4] * 6 + [2 * 24 * 9 * 4])


@pytest.mark.parametrize("factor,overflows", [(2.0, False), (3.0, True)])
def test_the_cast_check_reads_a_weight_block_by_block(tmp_path, monkeypatch, factor, overflows):
    """While planning, a weight scaled up is checked against its dtype's range block by block (each block's
    rows read alone): 30000 in the last block, times 3, overflows fp16; times 2 fits."""
    from bnfold.rules.base import Skip

    w = np.random.default_rng(0).uniform(-1, 1, (32, 24, 3, 3)).astype(np.float16)
    w[31, 0, 0, 0] = 30000
    g = G(dtype=np.float16)
    m = g.model([g.node("Conv", [g.input("x", [1, 24, 5, 5]), g.const(w, "w")])])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    monkeypatch.setattr(protofile, "BLOCK_BYTES", 5 * 24 * 9 * 2)
    with load_model(src, skeleton=True) as loaded:
        reads = []
        real = loaded.source.data
        monkeypatch.setattr(loaded.source, "data", lambda ref, start=0, n=None: reads.append(n) or real(ref, start, n))
        p = Param(np.dtype(np.float16), factor=np.full((32, 1, 1, 1), factor), stored_shape=w.shape, detached=True,
                  loader=protofile.tensor_loader(loaded.model.graph.initializer[0]))
        if overflows:
            with pytest.raises(Skip, match="overflows float16"):
                p.check_cast("w")
            assert reads[:7] == [5 * 24 * 9 * 2] * 6 + [2 * 24 * 9 * 2]  # then the exact check reads it whole
        else:
            p.check_cast("w")
            assert reads == [5 * 24 * 9 * 2] * 6 + [2 * 24 * 9 * 2]


def test_computed_tensors_are_read_again_from_their_recipes(tmp_path, monkeypatch):
    """A folded weight written in place of the weight it is computed from is read (verify, tensor_array) as
    the folded value, each time afresh, from the source file; and written once per write."""
    m = wide_chain()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    seen = _Evaluations(monkeypatch)
    report = fold_onnx_file(src, tmp_path / "out.onnx", verify=True)  # ORT runs both: recipes evaluated
    assert report.folded == 3 and seen.count == 6 and seen.most_alive <= 3  # (3 for verify's copy, 3 written)
    written = {t.name: t for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    with load_model(src, skeleton=True) as loaded, protofile.deferred_tensors():
        folded, _ = fold_model(loaded.model, inplace=True)
        weights = [t for t in folded.graph.initializer if t.name in {n.input[1] for n in folded.graph.node}]
        assert len(weights) == 3 and all(protofile.is_reference(t) for t in weights)
        before = seen.count
        for t in weights:
            a, b = protofile.tensor_array(t), protofile.tensor_array(t)
            assert a is not b and not np.shares_memory(a, b)
            np.testing.assert_array_equal(a, numpy_helper.to_array(written[t.name]))
            assert protofile.tensor_size(t) == written[t.name].ByteSize()
        assert seen.count == before + 6
    assert (tmp_path / "out.onnx").exists()


def _fold_peak_above_imports(src, dst) -> int:
    """Bytes by which a fresh interpreter's own high-water mark (VmHWM) rises while it folds ``src`` to ``dst``,
    after importing onnx, numpy and bnfold."""
    code = textwrap.dedent(f"""
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        import onnx, numpy, bnfold.fold
        base = hwm()
        bnfold.fold.fold_onnx_file({str(src)!r}, {str(dst)!r})
        print(hwm() - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(dst).parent)
    return int(out.stdout.split()[-1])


def test_peak_memory_of_a_fold_that_rewrites_every_weight(tmp_path):
    """VmHWM of a fresh interpreter (exec'd): a fold that rewrites every weight (38 MB of them, as in
    ResNet-50) holds one computed weight at a time, not all of them (the old code held them all: 48 MB)."""
    g = G()
    y = g.input("x", [1, 256, 4, 4])
    for _ in range(16):
        y = g.bn(g.conv(y, 256, 256, k=3, bias=False), 256)
    m = g.model([y])
    folded = sum(t.ByteSize() for t in m.graph.initializer if len(t.dims) == 4)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    used = _fold_peak_above_imports(src, tmp_path / "new.onnx")
    # one weight read and one computed (2.4 MB each), the checker's and shape inference's own memory: ~12 MB
    assert used < 0.5 * folded, (used, folded)
    assert [n.op_type for n in onnx.load(str(tmp_path / "new.onnx")).graph.node] == ["Conv"] * 16


def test_reading_on_demand_matches_onnx(tmp_path):
    m = decorated()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    whole = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    with load_model(src, skeleton=True) as loaded:
        refs = [t for t in loaded.model.graph.initializer if protofile.is_reference(t)]
        assert refs and all(t.data_type != TensorProto.INT64 for t in refs)
        for t in loaded.model.graph.initializer:
            np.testing.assert_array_equal(protofile.tensor_array(t), whole[t.name])
        full = {t.name: t for t in m.graph.initializer}
        assert all(protofile.tensor_size(t) == full[t.name].ByteSize() for t in loaded.model.graph.initializer)
        assert loaded.source.materialize().SerializeToString() == m.SerializeToString()


def test_a_tensor_whose_data_does_not_match_its_dims_is_loaded_whole(tmp_path):
    """The index checks sizes exactly; a file it cannot vouch for goes the old way, with the old result: an
    untouched tensor passes through as it is, a tensor the fold reads is refused."""
    g = G()
    y = g.bn(g.conv(g.input("x", [1, 8, 12, 12]), 8, 32), 32)
    y = g.node("Relu", [g.conv(y, 32, 32)])
    m = g.model([y])
    untouched = next(t for t in m.graph.initializer if t.name == m.graph.node[-2].input[1])
    untouched.raw_data = untouched.raw_data + b"\0" * 4  # one element too many: the checker does not mind
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert protofile.open_model(src) is None
    fold_onnx_file(src, tmp_path / "out.onnx")
    assert sha(tmp_path / "out.onnx") == sha(legacy_fold(src, tmp_path))
    read = next(t for t in m.graph.initializer if t.name == m.graph.node[0].input[1])  # the conv before the BN
    read.raw_data = read.raw_data + b"\0" * 4
    onnx.save(m, src)
    with pytest.raises(BnfoldError, match="corrupted"):
        fold_onnx_file(src, tmp_path / "out2.onnx")
    assert not (tmp_path / "out2.onnx").exists()


def test_closed_source_is_an_error_not_garbage(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(n=1), src)
    loaded = load_model(src, skeleton=True)
    t = next(t for t in loaded.model.graph.initializer if protofile.is_reference(t))
    loaded.close()
    with pytest.raises(RuntimeError, match="closed"):
        protofile.tensor_array(t)


def test_a_recipe_read_after_its_source_closed_is_an_error_not_garbage(tmp_path):
    """A folded weight's recipe reads the source file when evaluated: once the source is closed (its file
    descriptor may then be another file's), evaluating it is an error."""
    src = tmp_path / "m.onnx"
    onnx.save(wide_chain(n=1), src)
    with protofile.deferred_tensors():
        loaded = load_model(src, skeleton=True)
        folded, _ = fold_model(loaded.model, inplace=True)
        w = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
        assert protofile.is_reference(w) and protofile.tensor_array(w).shape == (96, 96, 3, 3)
        loaded.close()
        with open(src, "rb"):  # likely reuses the closed descriptor's number
            with pytest.raises(RuntimeError, match="closed"):
                protofile.tensor_array(w)


def test_peak_memory_is_below_the_file_size(tmp_path):
    """VmHWM of a fresh interpreter (exec'd, so no inherited peak): folding a 42 MB model costs less than the file
    on top of the imports: untouched tensors are copied by the kernel, never read into the process; the
    rewritten ones (half of them here) are computed and encoded one at a time, when written."""
    g = G()
    y = g.input("x", [1, 256, 4, 4])
    for i in range(18):
        y = g.conv(y, 256, 256, k=3)
        y = g.bn(y, 256) if i % 2 else g.node("Relu", [y])
    m = g.model([y])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    size = src.stat().st_size
    assert size > 40e6
    def peak(call: str) -> int:
        code = textwrap.dedent(f"""
            def hwm():
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM"):
                        return int(line.split()[1]) * 1024
            import onnx, numpy, bnfold.fold, bnfold.onnx_fold, bnfold.onnx_io
            base = hwm()
            {call}
            print(hwm() - base)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    new = peak(f"bnfold.fold.fold_onnx_file({str(src)!r}, {str(tmp_path / 'new.onnx')!r})")
    whole = peak(f"m = bnfold.onnx_io.load_model({str(src)!r}).model; "
                 f"bnfold.onnx_io.save_model(bnfold.onnx_fold.fold_model(m, inplace=True)[0], "
                 f"{str(tmp_path / 'old.onnx')!r}, copy=False)")
    # the target: at most the file above imports (here: the rewritten half, the checker's and shape
    # inference's own memory); loading the model whole costs the file at least twice
    assert new <= 1.0 * size, (new, size)
    assert whole > 1.5 * size and new < whole / 2, (new, whole, size)


def test_no_conv_read_means_no_file_read(tmp_path):
    """A model with nothing to fold: the output is the input, copied by the kernel; the process reads (maps)
    none of the large tensors."""
    g = G()
    y = g.input("x", [1, 256, 4, 4])
    for _ in range(24):
        y = g.node("Relu", [g.conv(y, 256, 256, k=3)])
    m = g.model([y])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert _fold_peak_above_imports(src, tmp_path / "out.onnx") < 0.25 * src.stat().st_size
    assert onnx.load(str(tmp_path / "out.onnx")).graph == onnx.load(str(src)).graph


# ------------------------------------------------------------------------------------------------ crashes
FS_CALLS = ("open", "write", "replace", "rename", "unlink", "fsync", "mkdir", "rmdir", "copy_file_range")


def _in_child(fn, crash_at: int) -> int:
    return crash_in_child(fn, crash_at, FS_CALLS)


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
def test_a_crash_while_writing_a_skeleton_leaves_old_or_new(tmp_path, external):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    m = conv_chain(n=2)
    if external:
        onnx.save_model(m, src_dir / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    else:
        onnx.save(m, src_dir / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "folded.onnx"
    old = conv_chain(n=2, c=16)  # a different model already at the output
    save_model(old, out, external_data=external)
    old_bytes = onnx.load(str(out)).SerializeToString()
    new_ref = tmp_path / "ref"
    new_ref.mkdir()
    fold_onnx_file(src_dir / "m.onnx", new_ref / "folded.onnx")
    new_bytes = onnx.load(str(new_ref / "folded.onnx")).SerializeToString()
    seen = set()
    for k in range(300):
        code = _in_child(lambda: fold_onnx_file(src_dir / "m.onnx", out), k)
        got = onnx.load(str(out)).SerializeToString()  # loads, with its data: never a mix
        assert got in (old_bytes, new_bytes), k
        seen.add("new" if got == new_bytes else "old")
        if code == 0:
            break
        if got == new_bytes:  # crashed after the switch: put the old one back for the next instant
            for e in os.listdir(out_dir):
                p = out_dir / e
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            save_model(old, out, external_data=external)
            old_bytes = onnx.load(str(out)).SerializeToString()
    else:
        pytest.fail("the fold never completed")
    assert seen == {"old", "new"} and k >= 5


# ------------------------------------------------------------------------------------------------ companions
def test_renamed_and_copied_results_keep_their_data(tmp_path):
    """Fold to out/folded.onnx, rename it, copy it, fold again to out/folded.onnx: all three load."""
    src = tmp_path / "m.onnx"
    onnx.save_model(conv_chain(n=2), src, save_as_external_data=True, location="m.bin", size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    fold_onnx_file(src, out / "folded.onnx")
    os.rename(out / "folded.onnx", out / "folded_v1.onnx")
    shutil.copy(out / "folded_v1.onnx", out / "folded_copy.onnx")
    fold_onnx_file(src, out / "folded.onnx")
    fold_onnx_file(src, out / "folded.onnx")  # replaces a model whose data only it uses: that data goes
    for name in ("folded.onnx", "folded_v1.onnx", "folded_copy.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
        full = onnx.load(str(out / name))
        assert all(t.raw_data for t in full.graph.initializer if t.dims and np.prod(t.dims) > 256)
    data = sorted(f for f in os.listdir(out) if f.endswith(".data"))
    assert len(data) == 2, data  # the first result's (shared by v1 and the copy) and the current one's


def test_a_copy_of_the_current_output_keeps_its_data(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(conv_chain(n=2), src, save_as_external_data=True, location="m.bin", size_threshold=0)
    fold_onnx_file(src, tmp_path / "folded.onnx")
    shutil.copy(tmp_path / "folded.onnx", tmp_path / "keep.onnx")
    fold_onnx_file(src, tmp_path / "folded.onnx")
    onnx.load(str(tmp_path / "keep.onnx"))  # its data was not removed: the current output shared it


# ------------------------------------------------------------------------------------------------ design
def _imports(module: str) -> set[str]:
    import ast
    import importlib.util

    path = importlib.util.find_spec(module).origin
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("a,b", [("bnfold.outputs", "bnfold.onnx_io"), ("bnfold.calibrate", "bnfold.train"),
                                 ("bnfold.protofile", "bnfold.onnx_io")])
def test_no_import_circles(a, b):
    assert b not in _imports(a) or a not in _imports(b), f"{a} and {b} import each other"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_])
@pytest.mark.parametrize("shape", [(), (3,), (4, 2, 1, 1)])
def test_set_tensor_writes_what_copying_from_array_writes(dtype, shape):
    """``set_tensor`` fills a tensor in place (no intermediate message); the result is byte for byte the tensor
    ``t.CopyFrom(from_array(value, name))`` gives, whatever ``t`` held before (other data fields, external data,
    a doc string: all replaced)."""
    value = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    for before in (numpy_helper.from_array(np.ones((2, 2), np.float32), "old"),
                   onnx.helper.make_tensor("old", onnx.TensorProto.FLOAT, [2], [1.0, 2.0]),
                   onnx.TensorProto(name="old", data_type=1, dims=[5], data_location=onnx.TensorProto.EXTERNAL,
                                    doc_string="d",
                                    external_data=[onnx.StringStringEntryProto(key="location", value="x.data")])):
        a, b = onnx.TensorProto(), onnx.TensorProto()
        a.CopyFrom(before)
        b.CopyFrom(before)
        protofile.set_tensor(a, value, "w")
        b.CopyFrom(numpy_helper.from_array(value, "w"))
        assert a.SerializeToString() == b.SerializeToString()
        assert np.array_equal(numpy_helper.to_array(a), value)


def test_locations_of_lists_each_data_file_once_in_order():
    def ext(name, loc):
        return onnx.TensorProto(name=name, data_type=1, dims=[1], data_location=onnx.TensorProto.EXTERNAL,
                                external_data=[onnx.StringStringEntryProto(key="location", value=loc),
                                               onnx.StringStringEntryProto(key="offset", value="0")])
    g = onnx.helper.make_graph([], "g", [], [], initializer=[ext(f"t{i}", loc) for i, loc in
                                                              enumerate(["b.data", "a.data", "b.data", "c.data"])])
    m = onnx.helper.make_model(g)
    assert protofile.locations_of(m) == ["b.data", "a.data", "c.data"]
    many = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[
        ext(f"t{i}", f"{i}.data") for i in range(3000)]))
    assert protofile.locations_of(many) == [f"{i}.data" for i in range(3000)]
