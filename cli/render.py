"""Rich rendering of library results."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from bnfold.outputs import printable
from bnfold.report import AFFINE_OPS, MERGE_OPS, FoldReport


def cell(value, style: str | None = None) -> Text:
    """A table cell that shows ``value`` literally: never markup, control characters escaped."""
    return Text(printable("" if value is None else value), style=style or "")


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, on one line: a path becomes its file name, and what is still
    too long keeps its start and end around an ellipsis (``small_re…ded.onnx``), so no cell wraps a name."""
    text = printable(name)
    if len(text) > width and ("/" in text or "\\" in text):
        text = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or text
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def _name_width(console_width: int, others: int, longest: int, floor: int = 12) -> int:
    """Room for a name column: what the console leaves after the other columns, at least ``floor``."""
    return max(floor, min(longest, console_width - others))


#: Rows of the fold table. A longer report shows every skipped entry and the first folded ones, in graph order,
#: and one row for the rest: rich spends about as long laying out a 3,000-row table as the fold takes, and a
#: person reads the skips (``--report FILE`` and ``--json`` list every entry).
TABLE_ROWS = 100


def report_table(report: FoldReport, title: str, width: int = 80, max_rows: int = TABLE_ROWS) -> Table:
    """One row per BatchNorm (and folded affine op): what happened and, for skips, why; beyond ``max_rows``
    entries, the skipped ones first, then one row counting what is not shown. Names that do not fit ``width``
    are shortened (:func:`shorten`), never wrapped."""
    table = Table(title=cell(shorten(title, width)), title_justify="left")
    room = max(12, (width - 13) // 3)  # node and target share what the borders and the reason code leave
    table.add_column("node", no_wrap=True, max_width=room)
    table.add_column("action", no_wrap=True, max_width=room + 12)
    table.add_column("reason", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    shown, hidden = _table_entries(report.entries, max_rows)
    for e in shown:
        name = e.layer or e.bn
        name = f"{e.graph}/{name}" if e.graph else name
        if e.op in AFFINE_OPS + MERGE_OPS:
            name += f" ({e.op})"
        if e.status == "folded":
            table.add_row(cell(shorten(name, room)),
                          cell(f"{e.direction} → {shorten(e.into_layer or e.into or '', room)}", "green"), "", "")
        else:
            table.add_row(cell(shorten(name, room)), cell("skipped", "yellow"), cell(e.reason), cell(e.message))
    if hidden:
        folded = sum(e.status == "folded" for e in hidden)
        parts = [f"{folded:,} folded"] if folded else []
        parts += [f"{len(hidden) - folded:,} skipped"] if len(hidden) > folded else []
        table.add_row(cell(f"… {len(hidden):,} more"), cell(", ".join(parts)), "",
                      cell("not shown: --report FILE or --json lists every entry"))
    return table


def _table_entries(entries: list, max_rows: int) -> tuple[list, list]:
    """``(shown, hidden)``: every entry when they fit ``max_rows``; else the skipped ones (up to ``max_rows``),
    then the first folded ones, in graph order."""
    if len(entries) <= max_rows:
        return list(entries), []
    keep = [i for i, e in enumerate(entries) if e.status != "folded"][:max_rows]
    room = max_rows - len(keep)
    if room:
        keep += [i for i, e in enumerate(entries) if e.status == "folded"][:room]
    chosen = set(keep)
    return ([e for i, e in enumerate(entries) if i in chosen],
            [e for i, e in enumerate(entries) if i not in chosen])


def verify_table(result, width: int = 80) -> Table:
    """Per-output agreement of a verify run (failing outputs in red). Numbers never wrap or get cut: the
    table is compact (one space between columns), output names that do not fit are shortened
    (:func:`shorten`), and where even the numbers do not fit the tolerance columns go first (the verdict line
    states the tolerance), then mean_abs and p99_abs."""
    from rich import box

    cols = ["max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "atol", "rtol"]
    rows = [(name, {"max_abs": f"{s.max_abs:.2e}", "mean_abs": f"{s.mean_abs:.2e}", "p99_abs": f"{s.p99_abs:.2e}",
                    "max_rel": f"{s.max_rel:.2e}", "cosine": _cos(s.cosine), "atol": f"{s.atol:.0e}",
                    "rtol": f"{s.rtol:.0e}"}, s.passed) for name, s in result.outputs.items()]
    widths = {c: max([len(c)] + [len(r[1][c]) for r in rows]) for c in cols}
    longest = max([6] + [len(printable(n)) for n, _, _ in rows])
    for drop in ("atol", "rtol", "mean_abs", "p99_abs"):
        if width - sum(widths[c] + 1 for c in cols) >= min(longest, 12):
            break
        cols.remove(drop)
    room = _name_width(width, sum(widths[c] + 1 for c in cols), longest, floor=6)
    table = Table(title=cell(f"verify: {result.samples} samples ({result.inputs})"), title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    table.add_column("output", no_wrap=True, max_width=room)
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True, min_width=widths[col])
    for name, values, passed in rows:
        table.add_row(cell(shorten(name, room)), *(values[c] for c in cols), style=None if passed else "red")
    return table


def _cos(c) -> str:
    return "NaN" if c is None or c != c else f"{c:.6f}"


def _ms(x: float, ref: float) -> str:
    """``x`` with as many decimals as gives ``ref`` four significant digits (one format per row)."""
    import math

    return f"{x:.{max(0, 3 - math.floor(math.log10(ref))) if ref > 0 else 3}f}"


def _runtime_version(cfg: dict, env: dict) -> str:
    """The runtime that was timed, with its version: torch for ``--runtime torch``, else ONNX Runtime."""
    if cfg.get("runtime") == "torch":
        return f"torch {env.get('torch')}" + (f" ({cfg['compile_mode']})" if cfg.get("compile_mode") else "")
    return f"ONNX Runtime {env.get('onnxruntime')}"


def bench_table(run, width: int = 80) -> Table:
    """Latency per model and setting, with the ratio to the first model and its verdict. Narrow (below 110
    columns, and when piped) it keeps only the median, the ratio and their intervals; numbers never wrap, and
    names are never cut or broken inside the table: where the longest does not fit beside the numbers, rows are
    labelled ``#1``, ``#2``... and the title lists each label's full name."""
    from pathlib import Path

    names = [Path(r.model).name for r in run.results]
    if len(set(names)) < len({r.model for r in run.results}):
        names = [r.model for r in run.results]
    table = _bench_table(run, width, [printable(n) for n in names], legend=None)
    if _natural_width(table) <= width:
        return table
    labels = [f"#{k}" for k in range(1, len(names) + 1)]
    seen: dict[str, str] = {}
    for label, name in zip(labels, names):
        seen.setdefault(name, label)
    labels = [seen[n] for n in names]  # a model listed twice keeps one label
    legend = [f"{seen[n]} {printable(n)}" for n in dict.fromkeys(names)]
    return _bench_table(run, width, labels, legend=legend)


def _natural_width(table: Table) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    con = Console(width=100_000)
    return Measurement.get(con, con.options, table).maximum


def _bench_table(run, width: int, names: list[str], legend: list[str] | None) -> Table:
    from rich import box

    from bnfold.bench import judge

    wide, narrow = width >= 110, width < 80
    title = Text("latency (ms); ratio = model / first model")
    for line in legend or ():
        title.append("\n" + line)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    min_effect = run.config.get("min_effect", 0.02)
    if narrow:  # below 80 columns: two lines per cell, so no number is ever cut
        table.add_column("model / setting", no_wrap=True)
        for col in ("p50 / 95% CI", "ratio / 95% CI"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("verdict", overflow="fold")
    else:
        table.add_column("model", no_wrap=True)
        table.add_column("setting", no_wrap=True)
        cols = ["p50", "95% CI"] + (["p90", "p99", "sessions"] if wide else []) + ["ratio", "95% CI", "verdict"]
        for col in cols:
            table.add_column(col, justify="right", no_wrap=True)
    for r, name in zip(run.results, names):
        setting = f"{r.ep} {r.opt_level} {r.batch}"
        p50 = _ms(r.p50_ms, r.p50_ms)
        ci = f"{_ms(r.ci95_ms[0], r.p50_ms)}-{_ms(r.ci95_ms[1], r.p50_ms)}"
        if r.verdict is None:
            ratio, rci, word = "1", "", "baseline"
        else:
            v = judge(r.ratio, r.ratio_ci95, min_effect, getattr(r, "spread_halfwidth", None))
            excludes_1 = r.ratio_ci95[0] > 1 or r.ratio_ci95[1] < 1
            word = (v if v == "underpowered" else f"below {100 * min_effect:g}%" if v == "none" and excludes_1
                    else "no diff." if v == "none" else f"{100 * abs(1 - r.ratio):.1f}% {v}")
            ratio, rci = f"{r.ratio:.3f}", f"{r.ratio_ci95[0]:.3f}-{r.ratio_ci95[1]:.3f}"
        if narrow:
            table.add_row(Text(name) + "\n" + cell(setting), f"{p50}\n{ci}", f"{ratio}\n{rci}", word)
            continue
        row = [Text(name), setting, p50, ci]
        if wide:
            row += [_ms(r.p90_ms, r.p50_ms), _ms(r.p99_ms, r.p50_ms), f"{r.sessions}x{min(r.rounds_per_session or [0])}"]
        table.add_row(*row, ratio, rci, word)
    env = run.env
    cfg = run.config
    table.caption = cell(
        f"setting: provider, opt level, batch. {env.get('cpu')} ({env.get('cpu_count')} cores)"
        + (f", {env['gpu']}" if env.get("gpu") else "") + f"; {_runtime_version(cfg, env)}; {cfg['sessions']} "
        f"sessions of >= {cfg['rounds_per_session']} rounds and >= {cfg.get('min_session_s')} s"
        + (f" ({cfg['duration_s']} s in all)" if cfg.get("duration_s") else "")
        + f", warm-up {cfg['warmup']}, threads {cfg['threads'] or 'default'}, spinning {'on' if cfg.get('spin') else 'off'}; "
        f"load {cfg.get('load_start')}. A difference is named when its interval excludes 1 and it exceeds "
        f"{100 * min_effect:g}%.")
    table.caption.justify = "left"
    return table


def _g(x) -> str:
    return "" if x is None else f"{x:.3g}"


def precision_table(prec: dict, *, all_layers: bool = False) -> Table:
    """The range certificate (bnfold.precision): every layer (``all_layers``), or only those kept in fp32 or
    with weights that underflow; largest weight/bias/output against the dtype's largest finite value."""
    rows = [x for x in prec["layers"] if all_layers or x["runs_in"] == "fp32" or x["subnormal"] or x["zero"]]
    title = (f"{prec['dtype']} range (largest finite {prec['max_finite']:.6g}, smallest normal "
             f"{prec['smallest_normal']:.3g}): {len(rows)} of {len(prec['layers'])} nodes")
    table = Table(title=cell(title), title_justify="left")
    table.add_column("node", overflow="fold", ratio=1)
    table.add_column("runs in", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    for col in ("max |w|", "max |b|", "max |out|"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("underflow", justify="right", no_wrap=True)
    for x in rows:
        name = f"{x['graph']}/{x['node']}" if x["graph"] else x["node"]
        under = f"{x['subnormal']} sub, {x['zero']} zero" if x["subnormal"] or x["zero"] else ""
        if x["worst_channel"] is not None and under:
            under += f" (ch {x['worst_channel']})"
        table.add_row(cell(f"{name} ({x['op']})"), cell(x["runs_in"], "yellow" if x["runs_in"] == "fp32" else None),
                      cell(x["reason"]), _g(x["weight_max"]), _g(x["bias_max"]), _g(x["output_max"]), under)
    return table
