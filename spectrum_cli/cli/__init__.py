"""The command line: thin typer adapters over the library modules.

Each command parses its flags, calls one library function and renders the result. Results go
to stdout, progress and diagnostics to stderr. Heavy libraries (torch, zarr, dask) are
imported inside the commands so that ``spectrum --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from spectrum_cli import __version__
from spectrum_cli.cli import analyze as _analyze
from spectrum_cli.cli.output import console, err_console
from spectrum_cli.errors import SpectrumError

app = typer.Typer(
    name="spectrum",
    help="Spectral dynamics of weights: decompose checkpoints once, then ask the store.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"verbose": False}


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
    handler = RichHandler(console=err_console, show_time=False, show_path=False)
    handler.setLevel(level)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    logging.getLogger("spectrum_cli").setLevel(level)
    for noisy in ("distributed", "dask"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    err_console.quiet = quiet


_analyze.register(app)


def main() -> None:
    """Entry point: run the app, turning spectrum's own errors into one red line."""
    import click
    from rich.text import Text

    try:
        app(standalone_mode=False)
    except SpectrumError as error:
        if _state["verbose"]:
            err_console.print_exception()
        err_console.print(Text.assemble(("error: ", "red"), str(error)), highlight=False)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        error.show(file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]; what was stored stays stored")
        sys.exit(130)
