"""bnfold: fold BatchNormalization into neighbouring conv/linear layers, export, verify and benchmark.

Python API (the command line is a thin skin over it)::

    import onnx, bnfold
    folded, report = bnfold.fold_model(onnx.load("model.onnx"))
    print(report.summary())
    bnfold.fold_onnx_file("model.onnx", "folded.onnx")
"""

from bnfold._version import __version__
from bnfold.errors import BnfoldError, InvalidStatisticsError
from bnfold.fold import fold_onnx_file, inspect_onnx_file
from bnfold.formula import Affine, bn_affine, cast_checked, fold_backward, fold_forward
from bnfold.onnx_fold import FoldOptions, count_bn, fold_model, inspect_model
from bnfold.report import REASONS, FoldEntry, FoldReport

__all__ = [
    "__version__",
    "Affine",
    "BnfoldError",
    "FoldEntry",
    "FoldOptions",
    "FoldReport",
    "InvalidStatisticsError",
    "REASONS",
    "bn_affine",
    "cast_checked",
    "count_bn",
    "fold_backward",
    "fold_forward",
    "fold_model",
    "fold_onnx_file",
    "inspect_model",
    "inspect_onnx_file",
]
