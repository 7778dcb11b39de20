"""Shared command-line plumbing: logging flags, error handling, output streams.

Conventions: exit 0 ok, 1 a check failed, 2 bad input or usage, 3 internal error (a bug in bnfold). Errors are one line without a traceback
(``--debug`` shows it). With ``--json`` the machine-readable result goes to stdout and everything else to stderr.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from bnfold.errors import BnfoldError, Terminated, VerificationFailed
from bnfold.outputs import handle_signals, printable, strict_json

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class Styled(str):
    """Escaped text with a rich style (:func:`styled`): coloured on a terminal, plain text elsewhere."""

    style: str = ""


def styled(text, style: str) -> Styled:
    """``text`` (escaped) in ``style``: the only way to colour output on a :class:`SafeConsole`."""
    s = Styled(printable(text))
    s.style = style
    return s


@functools.cache
def _rich_console_class():
    from rich.console import Console
    from rich.text import Text

    class RichSafeConsole(Console):
        """A rich console on which text is data: no markup, no emoji codes, no highlighting, and every string
        printed has its control characters escaped (a node name cannot move the cursor, set the title or
        write the clipboard). Styling is given explicitly with :func:`styled` pieces."""

        def __init__(self, **kwargs):
            super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

        def print(self, *objects, **kwargs):
            kwargs.pop("markup", None)
            if all(isinstance(o, (str, Text)) for o in objects):
                kwargs.setdefault("soft_wrap", True)  # a line stays one line; tables keep the console's width
            super().print(*(Text(o, style=o.style) if isinstance(o, Styled) else
                            Text(printable(o)) if isinstance(o, str) else o for o in objects), **kwargs)
    return RichSafeConsole


#: environment variables with which rich styles output that is not a terminal
_FORCE_STYLE = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES")


class SafeConsole:
    """Where the commands print: rich's console (:func:`_rich_console_class`, escaping every string), created
    when first needed. A line of text (strings and :func:`styled` pieces) printed to something that is not a
    terminal is written as rich writes it there, unstyled, without importing rich (about 25 ms of every
    command's start-up); tables, progress and terminals go through rich."""

    def __init__(self, *, stderr: bool = False, **kwargs):
        self._stderr, self._kwargs, self._rich = stderr, kwargs, None

    @property
    def rich(self):
        if self._rich is None:
            self._rich = _rich_console_class()(stderr=self._stderr, **self._kwargs)
        return self._rich

    def _plain_file(self):
        """The stream to write a plain line to, or None when rich must print (a terminal, forced styles)."""
        if self._rich is not None or self._kwargs or any(os.environ.get(v) for v in _FORCE_STYLE):
            return None
        f = sys.stderr if self._stderr else sys.stdout
        try:
            return None if f.isatty() else f
        except (AttributeError, ValueError):
            return None

    def print(self, *objects, sep: str = " ", end: str = "\n", **kwargs):
        f = self._plain_file() if set(kwargs) <= {"soft_wrap"} and all(isinstance(o, str) for o in objects) \
            else None
        if f is None:
            self.rich.print(*objects, sep=sep, end=end, **kwargs)
            return
        f.write(sep.join(o if isinstance(o, Styled) else printable(o) for o in objects) + end)
        f.flush()

    def __getattr__(self, name):  # width, file, ...: rich's
        return getattr(self.rich, name)


err_console = SafeConsole(stderr=True)


def out_console(json_mode: bool) -> SafeConsole:
    """Where human-readable output goes: stderr when stdout carries JSON."""
    return err_console if json_mode else SafeConsole()


class _SafeFormatter(logging.Formatter):
    def formatMessage(self, record):  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))


def common_options(f):
    """-v/-q/--debug on every command."""

    @click.option("-v", "--verbose", count=True, help="More log output (repeat for debug logs).")
    @click.option("-q", "--quiet", is_flag=True, help="Only errors and the final result.")
    @click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
    @functools.wraps(f)
    def wrapper(*args, verbose: int, quiet: bool, debug: bool, **kwargs):
        level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 or debug else
                                             logging.INFO if verbose else logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SafeFormatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler], force=True)
        ctx = click.get_current_context()
        ctx.meta["quiet"] = quiet
        try:
            with handle_signals():  # SIGINT/SIGTERM unwind (temporaries removed), then exit 130/143
                return f(*args, **kwargs)
        except BnfoldError as exc:
            if debug:
                raise
            err_console.print(styled("error:", "bold red"), str(exc))
            ctx.exit(EXIT_BAD_INPUT)
        except VerificationFailed as exc:
            json_mode = kwargs.get("json_mode", False)
            if json_mode:
                click.echo(strict_json(exc.result.to_dict()))
            err_console.print(exc.result.verdict() + " (nothing written)")
            ctx.exit(EXIT_FAILED)
        except KeyboardInterrupt:
            err_console.print(styled("interrupted", "bold red"), "(SIGINT; temporary files removed)")
            ctx.exit(EXIT_SIGINT)
        except Terminated:
            err_console.print(styled("terminated", "bold red"), "(SIGTERM; temporary files removed)")
            ctx.exit(EXIT_SIGTERM)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # a bug: still one line unless --debug
            if debug:
                raise
            err_console.print(styled("internal error:", "bold red"), f"{type(exc).__name__}: {exc} (rerun with "
                              "--debug for the traceback and report it)")
            ctx.exit(EXIT_INTERNAL)

    return wrapper


def json_option(f):
    return click.option("--json", "json_mode", is_flag=True,
                        help="Print the result as JSON on stdout (everything else goes to stderr).")(f)


def fold_options(f):
    """Switches of the fold pass, shared by `inspect` and `fold`."""
    f = click.option("--lower-standalone", is_flag=True,
                     help="Rewrite a BatchNorm with no foldable neighbour as Mul+Add.")(f)
    f = click.option("--no-forward", is_flag=True, help="Never fold a BatchNorm into its consumer.")(f)
    f = click.option("--no-merge", is_flag=True,
                     help="Keep parallel branches (conv/BN/identity summed by Add/Sub/Sum) instead of merging them "
                          "into one Conv.")(f)
    f = click.option("--no-affine", is_flag=True,
                     help="Leave per-channel Mul/Add/Sub/Div-by-constant ops after conv/linear layers alone.")(f)
    return f


def weights_options(f):
    """--weights / --random-weights / --trust-pickle: the weights of a PyTorch SPEC, for every command that
    builds one. Pass the values to :func:`resolve_weights` (the policy is the library's
    :func:`bnfold.torch_io.choose_weights`)."""
    f = click.option("--trust-pickle", is_flag=True,
                     help="Load a .pt/.pth checkpoint that is not weights-only (this runs code from the file: "
                          "only for files you trust).")(f)
    f = click.option("--random-weights", is_flag=True,
                     help="Use the factory's random initialisation (seed 0) on purpose, for smoke tests; "
                          "without --weights or this, a PyTorch SPEC is refused (zoo models have their own).")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                     help="State dict for a PyTorch SPEC: .pt/.pth (weights-only) or .safetensors; its sha256 "
                          "is recorded in the outputs.")(f)
    return f


def resolve_weights(spec: str, weights, random_weights: bool):
    """The :class:`bnfold.torch_io.WeightsSource` for ``spec`` (exit 2 naming --weights and --random-weights
    when there is none). Announce it with :func:`weights_note` once the model is built."""
    from bnfold.torch_io import choose_weights

    return choose_weights(spec, weights, random_weights)


def weights_note(spec: str, source) -> None:
    """Say on stderr when a zoo model runs on its own (untrained) weights: never silent."""
    if source is not None and source.kind == "zoo":
        err_console.print(styled("note:", "yellow"), f"{spec}: no --weights given: using the zoo's own weights "
                          f"(random initialisation, seed {source.seed}, BatchNorm statistics randomized; not "
                          "trained)")


def torch_model_options(f):
    """How to build a PyTorch MODEL given as a factory spec."""
    f = click.option("--opset", type=int, default=None, help="ONNX opset for the export (default 18).")(f)
    f = click.option("--input-shape", multiple=True, metavar="[NAME=]1x3x224x224",
                     help="Shape of each model input (repeat for several inputs).")(f)
    return weights_options(f)


def reparameterize_option(f):
    """--reparameterize: call the PyTorch model's own deploy switches before folding."""
    return click.option("--reparameterize", is_flag=True,
                        help="PyTorch MODEL: first call every module's own deploy switch (reparameterize(), "
                             "switch_to_deploy(), fuse(), fuse_model(); `bnfold inspect MODEL` lists them), as "
                             "timm's reparameterize_model does; reported.")(f)


def verify_options(f):
    """How verify compares a reference and a candidate (shared by `verify` and `fold --verify`)."""
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")(f)
    f = click.option("--batch", type=int, default=8, show_default=True,
                     help="Batch size of random inputs when the batch dimension is dynamic.")(f)
    f = click.option("--rtol", type=float, default=None,
                     help="Relative tolerance: with or without --atol, a fixed tolerance replaces the default, "
                          "each channel's rounding budget.")(f)
    f = click.option("--atol", type=float, default=None,
                     help="Absolute tolerance for every element (a fixed tolerance instead of the rounding "
                          "budget; with --rtol alone atol follows the dtype).")(f)
    f = click.option("--ep", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]), default="cpu", show_default=True,
                     help="ONNX Runtime execution provider; one that cannot run here is an error; 'auto': cuda "
                          "where it runs, else cpu (the verdict names what was skipped).")(f)
    f = click.option("--data", metavar="digits|FILE.npz|DIR",
                     help="Real inputs: the bundled digits (the held-out split train reports on; digits:all "
                          "for all), an .npz (arrays named after the inputs, optional 'labels'), or an image "
                          "folder (one subfolder per class).")(f)
    return f
