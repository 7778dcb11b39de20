"""The plan/report data model: one entry per BatchNorm (and per folded affine op), saying what happened to it.

A *plan* is a report produced without writing anything (``dry_run``); a report is the plan as applied.
Skip reasons are stable snake_case codes (:data:`REASONS`); scripts may rely on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Status = Literal["folded", "skipped"]
#: Entries whose ``op`` is one of these are per-channel affine ops folded like a BN, not BatchNorms.
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
#: Entries whose ``op`` is one of these and whose direction is ``merged`` are branch merges: an Add/Sub/Sum of
#: parallel branches made one Conv (``folded``), or refused (``skipped``, with a reason).
MERGE_OPS = ("Add", "Sub", "Sum")
Direction = Literal["backward", "forward", "lowered", "merged"]

#: Every skip reason code, with what it means. Codes are stable across releases.
REASONS: dict[str, str] = {
    "training_mode": "the BatchNormalization runs in training mode (training_mode=1 or is_test=0)",
    "extra_outputs": "the BatchNormalization produces running/saved statistics outputs that something uses",
    "spatial_disabled": "spatial=0: statistics per channel and position, not a per-channel affine map",
    "non_constant_parameters": "scale, bias, mean or variance depend on graph inputs",
    "no_foldable_neighbour": "neither the producer nor the consumer of the BatchNormalization can absorb it",
    "producer_output_shared": "the producer's output is also used by another node or is a graph output",
    "producer_weight_not_constant": "the producer's weight or bias depends on graph inputs",
    "channel_axis_mismatch": "the BatchNorm channel axis is not the layer's feature axis",
    "channel_count_mismatch": "the BatchNorm has a different channel count than the layer",
    "consumer_padded": "the consumer convolution pads its input, so a forward fold would not be exact",
    "consumer_output_shared": "the BatchNorm output has several consumers or is a graph output",
    "unknown_rank": "the rank of the tensor is unknown, so the channel axis cannot be checked",
    "cast_overflow": "a folded value overflows the model's dtype",
    # branch merge (an Add/Sub/Sum of parallel branches that each read the same tensor)
    "branch_strides_differ": "the branches have different strides (or an identity branch meets a strided conv): "
                             "their sum is not one convolution",
    "branch_dilations_differ": "a branch's dilation places its taps off the largest branch's window",
    "branch_pads_misaligned": "the branches' pads do not align their windows (shifted taps, different output sizes, "
                              "or auto_pad SAME whose pads depend on the input size)",
    "branch_inputs_differ": "two or more branches are convolutions/BatchNorms of different tensors",
    "branch_output_shared": "a branch's output is also read elsewhere (another node or a graph output)",
    "unsupported_dtype": "the tensors have a dtype that cannot be folded (not floating point)",
    "inside_function": "the BatchNormalization lives in a model-local function, which bnfold does not rewrite",
    "overridable_initializer": "a parameter is an initializer that is also a graph input: the caller may override "
                               "it, so it is not a constant",
    "quantized_weight": "the layer's weight is dequantized in the graph (DequantizeLinear): folding would turn the "
                        "quantized weight into a float one",
    "constant_too_large": "a parameter is computed from constants, but the result would exceed the size bound "
                          "(the model's own size)",
    # PyTorch front end
    "module_reused": "the conv/linear module is called more than once",
    "parameters_tied": "the conv/linear parameters are shared with another module",
    "not_plain_batchnorm": "a BatchNorm subclass that does more than normalise",
    "not_called": "the BatchNorm module is never called in the traced forward pass",
    "unknown_eps": "a frozen BatchNorm without an eps attribute whose forward is not a per-channel affine map",
    "module_has_hooks": "the module has forward hooks (or its call computes more than the layer)",
    "parametrized_weight": "the layer's weight is computed by a parametrization such as weight norm",
    "parameters_used_elsewhere": "a parameter of the module is also read outside its call (e.g. functionally)",
}


@dataclass
class FoldEntry:
    """What happened to one BatchNorm (or one folded per-channel affine op)."""

    bn: str
    status: Status
    into: str | None = None
    direction: Direction | None = None
    reason: str | None = None
    message: str = ""
    op: str = "BatchNormalization"
    graph: str = ""
    #: the source-framework layer (e.g. the torch module path ``layer1.0.bn1``) when the model records it
    layer: str | None = None
    into_layer: str | None = None

    def __post_init__(self):
        assert self.status in ("folded", "skipped"), self.status
        assert self.status == "folded" or self.reason in REASONS, self.reason

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldReport:
    """Entries for every BatchNorm in a model, plus counts; ``to_dict`` gives the JSON report."""

    entries: list[FoldEntry] = field(default_factory=list)
    model: str = ""
    dry_run: bool = False
    extra: dict = field(default_factory=dict)

    def _bn(self):
        return [e for e in self.entries if e.op not in AFFINE_OPS + MERGE_OPS]

    def _merges(self):
        return [e for e in self.entries if e.op in MERGE_OPS and e.direction == "merged"]

    @property
    def bn_total(self) -> int:
        return len(self._bn())

    @property
    def folded(self) -> int:
        return sum(e.status == "folded" for e in self._bn())

    @property
    def skipped(self) -> int:
        return sum(e.status == "skipped" for e in self._bn())

    @property
    def affine_folded(self) -> int:
        return sum(e.status == "folded" and e.direction != "merged" for e in self.entries if e.op in AFFINE_OPS)

    @property
    def branches_merged(self) -> int:
        """Add/Sub/Sum nodes whose branches were merged into one Conv."""
        return sum(e.status == "folded" for e in self._merges())

    @property
    def merges_refused(self) -> int:
        return sum(e.status == "skipped" for e in self._merges())

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dry_run": self.dry_run,
            "bn_total": self.bn_total,
            "folded": self.folded,
            "skipped": self.skipped,
            "affine_folded": self.affine_folded,
            "branches_merged": self.branches_merged,
            "merges_refused": self.merges_refused,
            "entries": [e.to_dict() for e in self.entries],
            **self.extra,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, **kw)

    def summary(self) -> str:
        s = f"{self.folded}/{self.bn_total} BatchNorm folded, {self.skipped} skipped"
        if self.affine_folded:
            s += f", {self.affine_folded} per-channel affine op(s) folded"
        if self.branches_merged:
            s += f", {self.branches_merged} branch sum(s) merged into one Conv"
            if self.merges_refused:
                s += f" ({self.merges_refused} refused)"
        return s
