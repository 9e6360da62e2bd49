"""What every ``distill`` command shares: the console, and one error policy for the whole command line.

Errors the user can fix (bad files, formats, model specs, options; ``distill.errors.UserError``) print one
``error:`` line and exit 2. Anything else is a bug or the machine running out of something: its traceback is
printed with one line of advice, exit 1. ``distill --debug ...`` shows tracebacks for every error.
"""

from __future__ import annotations

import traceback
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from distill.errors import UserError

console = Console(stderr=True, soft_wrap=True)  # never hard-wrap messages in logs

# OSError subclasses we raise for missing, existing or unreadable files; ValueError for bad values and formats.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError, UserError)
ADVICE = (
    "unexpected error (traceback above). Out of memory: lower --max-tokens or --batch-size. "
    "Otherwise it is a bug: please report it with the traceback and the command."
)


class Commands(TyperGroup):
    """A Typer group that applies the error policy to every command it runs."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except USER_ERRORS as e:
            if ctx.find_root().params.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {escape(str(e))}")  # messages name files and specs: no markup in them
            raise typer.Exit(2) from None
        except Exception:
            if ctx.find_root().params.get("debug"):
                raise
            traceback.print_exc()
            console.print(f"[bold red]error:[/] {ADVICE}")
            raise typer.Exit(1) from None


def task_list(tasks: str | None) -> list[str] | None:
    """``pfam,scope`` -> ["pfam", "scope"]; None (every head) when not given."""
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


# Scaling out (distill.scale): the same four options on annotate, teacher-cache and index.
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Run the chunks on a Ray actor pool: 'local' starts Ray on this machine, 'auto' or HOST:PORT joins a cluster "
        "(`ray start --head`). Needs esm-distill[ray] on every machine.",
    ),
]
Workers = Annotated[int, typer.Option(help="With --ray: actors, one loaded model each.")]
Threads = Annotated[
    int, typer.Option(help="CPU threads per model copy (0: the library's default); with --ray, per actor and its CPU reservation.")
]
GpusPerWorker = Annotated[float, typer.Option(help="With --ray: GPUs per actor (0: CPU actors).")]
Shard = Annotated[
    str | None,
    typer.Option(help="I/N: do only the I-th (from 0) of N contiguous parts (a scheduler array task); `distill merge` joins them."),
]
