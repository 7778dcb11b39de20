"""Rich rendering of library results."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from bnfold.outputs import printable
from bnfold.report import AFFINE_OPS, FoldReport


def cell(value, style: str | None = None) -> Text:
    """A table cell that shows ``value`` literally: never markup, control characters escaped."""
    return Text(printable("" if value is None else value), style=style or "")


def report_table(report: FoldReport, title: str) -> Table:
    """One row per BatchNorm (and folded affine op): what happened and, for skips, why."""
    table = Table(title=cell(title), title_justify="left")
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
            table.add_row(cell(name), cell(f"{e.direction} → {e.into_layer or e.into}", "green"), "", "")
        else:
            table.add_row(cell(name), cell("skipped", "yellow"), cell(e.reason), cell(e.message))
    return table


def verify_table(result) -> Table:
    """Per-output agreement of a verify run (failing outputs in red)."""
    table = Table(title=cell(f"verify: {result.samples} samples ({result.inputs})"), title_justify="left")
    table.add_column("output", overflow="fold")
    for col in ("max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "atol", "rtol"):
        table.add_column(col, justify="right")
    for name, s in result.outputs.items():
        table.add_row(cell(name), f"{s.max_abs:.2e}", f"{s.mean_abs:.2e}", f"{s.p99_abs:.2e}", f"{s.max_rel:.2e}",
                      f"{s.cosine:.6f}", f"{s.atol:.0e}", f"{s.rtol:.0e}", style=None if s.passed else "red")
    return table


def bench_table(run) -> Table:
    """Latency per model and setting, with the ratio to the first model."""
    table = Table(title="latency (ms)", title_justify="left")
    for col in ("model", "ep", "opt", "batch", "p50", "95% CI", "p90", "p99", "mean", "ratio (95% CI)"):
        table.add_column(col, justify="left" if col in ("model", "ep", "opt") else "right", overflow="fold")
    for r in run.results:
        ratio = "" if r.ratio is None else f"{r.ratio:.3f} [{r.ratio_ci95[0]:.3f}, {r.ratio_ci95[1]:.3f}]"
        table.add_row(cell(r.model), cell(r.ep), cell(r.opt_level), str(r.batch), f"{r.p50_ms:.3f}",
                      f"{r.ci95_ms[0]:.3f}-{r.ci95_ms[1]:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
                      f"{r.mean_ms:.3f}", ratio)
    env = run.env
    table.caption = cell(f"{env.get('cpu')} ({env.get('cpu_count')} cores)" + (f", {env['gpu']}" if env.get("gpu") else "")
                     + f"; ORT {env.get('onnxruntime')}; warmup {run.config['warmup']}, "
                     f"{'duration ' + str(run.config['duration_s']) + ' s' if run.config['duration_s'] else str(run.config['iters']) + ' rounds'}"
                     f", threads {run.config['threads'] or 'default'}")
    return table
