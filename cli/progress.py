"""The plan line and progress bar of a benchmark (bench, run, demo): what it will do and about how long it
takes, then sessions done and time left. The bar shows only on a terminal and never with --quiet; the plan
line shows unless --quiet."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from .common import styled


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class BenchDisplay:
    """``on_plan`` and ``progress`` callbacks for :func:`bnfold.bench.bench` (its ``on_plan=`` and
    ``progress=``); use as a context manager so the bar is removed whatever happens."""

    def __init__(self, console: Console, quiet: bool = False, prefix: str = ""):
        # rich's own console (bnfold.cli.common.SafeConsole creates it when first needed): the bar draws on it
        self.console, self.quiet, self.prefix = getattr(console, "rich", console), quiet, prefix
        self.bar: Progress | None = None
        self.task = None

    def on_plan(self, plan) -> None:
        if self.quiet:
            return
        self.console.print(styled(f"{self.prefix}plan: {plan.describe()}", "dim"), soft_wrap=False)
        if not self.console.is_terminal:
            return
        self._close()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} sessions, {task.fields[left]}"),
                            console=self.console, transient=True)
        self.task = self.bar.add_task("benchmarking", total=plan.sessions * len(plan.settings),
                                      left=f"about {_seconds(plan.estimate_s)} left")
        self.bar.start()

    def progress(self, ev) -> None:
        if self.bar is None:
            return
        s = ev.setting
        self.bar.update(self.task, completed=ev.done, left=f"about {_seconds(ev.left_s)} left",
                        description=f"{s.ep} opt {s.opt_level} batch {s.batch}")
        if ev.done >= ev.total:
            self._close()

    def hooks(self) -> dict:
        return {"on_plan": self.on_plan, "progress": self.progress}

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()
