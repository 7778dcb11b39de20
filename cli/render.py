"""Rich rendering of library results."""

from __future__ import annotations

from rich.table import Table

from bnfold.report import FoldReport


def report_table(report: FoldReport, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("node")
    table.add_column("op")
    table.add_column("status")
    table.add_column("into")
    table.add_column("direction")
    table.add_column("reason / message", overflow="fold")
    for e in report.entries:
        status = "[green]folded[/]" if e.status == "folded" else "[yellow]skipped[/]"
        name = f"{e.graph}/{e.bn}" if e.graph else e.bn
        detail = e.message if e.status == "folded" else f"[bold]{e.reason}[/]: {e.message}"
        table.add_row(name, e.op, status, e.into or "-", e.direction or "-", detail)
    return table
