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
