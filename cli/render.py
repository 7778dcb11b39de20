"""Rich rendering of library results."""

from __future__ import annotations

from rich.table import Table

from bnfold.report import AFFINE_OPS, FoldReport


def report_table(report: FoldReport, title: str) -> Table:
    """One row per BatchNorm (and folded affine op): what happened and, for skips, why."""
    table = Table(title=title, title_justify="left")
    table.add_column("node", overflow="fold")
    table.add_column("action", overflow="fold")
    table.add_column("reason", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    for e in report.entries:
        name = e.layer or e.bn
        name = f"{e.graph}/{name}" if e.graph else name
        if e.op in AFFINE_OPS:
            name += f" ({e.op})"
        if e.status == "folded":
            table.add_row(name, f"[green]{e.direction} → {e.into_layer or e.into}[/]", "", "")
        else:
            table.add_row(name, "[yellow]skipped[/]", e.reason, e.message)
    return table


def verify_table(result) -> Table:
    """Per-output agreement of a verify run (failing outputs in red)."""
    table = Table(title=f"verify: {result.samples} samples ({result.inputs})", title_justify="left")
    table.add_column("output", overflow="fold")
    for col in ("max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "atol", "rtol"):
        table.add_column(col, justify="right")
    for name, s in result.outputs.items():
        table.add_row(name, f"{s.max_abs:.2e}", f"{s.mean_abs:.2e}", f"{s.p99_abs:.2e}", f"{s.max_rel:.2e}",
                      f"{s.cosine:.6f}", f"{s.atol:.0e}", f"{s.rtol:.0e}", style=None if s.passed else "red")
    return table
