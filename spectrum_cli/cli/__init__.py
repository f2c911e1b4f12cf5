"""The command line: thin typer adapters over the library modules.

Each command parses its flags, calls one library function and renders the result. Results go
to stdout, progress and diagnostics to stderr. Heavy libraries (torch, zarr, dask) are
imported inside the commands so that ``spectrum --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import NoReturn

import typer

from spectrum_cli import __version__
from spectrum_cli.cli import analyze as _analyze
from spectrum_cli.cli import dynamics as _dynamics
from spectrum_cli.cli import lmc as _lmc
from spectrum_cli.cli import masks as _masks
from spectrum_cli.cli.output import console, err_console, error_console
from spectrum_cli.errors import SpectrumError

app = typer.Typer(
    name="spectrum",
    help="Spectral dynamics of weights: decompose checkpoints once, then ask the store.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state: dict[str, object] = {"verbose": False}

# Loggers of Dask and the libraries under it, silent unless --verbose.
_DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")

# Flags of the whole program, accepted after the command too (`spectrum analyze runs/ -q`).
_GLOBAL_FLAGS = frozenset({"--verbose", "-v", "--quiet", "-q"})


def _version(value: bool) -> None:
    if value:
        console.print(f"spectrum {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs and tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Spectral dynamics of weights: decompose checkpoints once, then ask the store."""
    from rich.logging import RichHandler

    _state["verbose"] = verbose
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING

    # One handler for the whole process, on the console that --quiet leaves errors on.
    handler = _state.get("handler")
    if not isinstance(handler, logging.Handler):
        handler = RichHandler(console=error_console, show_time=False, show_path=False)
        logging.getLogger().addHandler(handler)
        _state["handler"] = handler
    handler.setLevel(level)
    logging.getLogger("spectrum_cli").setLevel(level)

    # Dask's own logs repeat what the summary reports (a failed task is a failed checkpoint,
    # an interrupted one a cancelled task). Importing distributed later resets its loggers'
    # levels, so its records are held back at the handler, unless --verbose asks for them.
    for noisy in _DASK_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    for old in list(handler.filters):
        handler.removeFilter(old)
    if not verbose:
        handler.addFilter(lambda record: not record.name.startswith(_DASK_LOGGERS))
    err_console.quiet = quiet


_analyze.register(app)
_dynamics.register(app)
_lmc.register(app)
_masks.register(app)


def main() -> None:
    """Entry point: run the app, turning errors into one red line and an exit code."""
    import click

    # Typer raises its own copy of click's exceptions; older versions raise click's.
    usage_errors = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    try:
        with warnings.catch_warnings():
            # Writes that Ctrl-C cut short are dropped unawaited; what was stored stays stored.
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            code = app(args=_global_flags_first(sys.argv[1:]), standalone_mode=False)
    except SpectrumError as error:
        if _state["verbose"]:
            error_console.print_exception()
        _error(str(error))
        sys.exit(error.exit_code)
    except usage_errors as error:
        _error(_usage_message(error))
        sys.exit(getattr(error, "exit_code", 2))
    except (typer.Abort, click.Abort):
        _error("aborted")
        sys.exit(130)
    # Outside standalone mode, an exit code is returned rather than raised.
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            _error("interrupted; what was stored stays stored")
        sys.exit(code)


def entry() -> NoReturn:
    """The ``spectrum`` command: `main`, then leave the process at once with its exit code.

    When `main` is done, every result is written, flushed and closed. Tearing the interpreter
    down module by module after torch, Zarr and Dask were imported would add about half a
    second to every command, so the process ends here instead.
    """
    try:
        main()
        code = 0
    except SystemExit as done:
        if isinstance(done.code, int):
            code = done.code
        elif done.code is None:
            code = 0
        else:  # a message, which Python would print
            print(done.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, as `spectrum ls | head`
            stream.flush()
    os._exit(code)


def _global_flags_first(args: list[str]) -> list[str]:
    """The arguments with ``--quiet`` and ``--verbose`` moved before the command.

    Arguments after ``--`` are left where they are: there they are names, not flags.
    """
    end = args.index("--") if "--" in args else len(args)
    flags = [arg for arg in args[:end] if arg in _GLOBAL_FLAGS]
    return flags + [arg for arg in args[:end] if arg not in _GLOBAL_FLAGS] + args[end:]


def _error(message: str) -> None:
    from rich.text import Text

    error_console.print(Text.assemble(("error: ", "red"), message), highlight=False)


def _usage_message(error: Exception) -> str:
    """One line: what was wrong with the command line, and where to read about it."""
    format_message = getattr(error, "format_message", None)
    message = format_message() if callable(format_message) else str(error)
    message = " ".join(message.split())
    # Typer words a bad value as its validator does ("Value error, 'x' is not one of …",
    # "Input should be greater than or equal to 1"); say it plainly.
    message = message.replace(": Value error, ", ": ").replace(": Input should be ", ": must be ")
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message
