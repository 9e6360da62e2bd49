"""What every ``distill`` command shares: the console, and one error policy for the whole command line.

Usage errors (a missing or unknown option, a bad choice or type) are click's: one usage line, exit 2. Errors the
user can fix (bad files, formats, model specs, option values; ``distill.core.errors.UserError``) print one ``error:``
line and exit 2. Anything else is a bug or the machine running out of memory: its traceback is printed with one line
of advice (the memory hint only for an out-of-memory error), exit 1. ``distill --debug ...`` shows tracebacks for
every error.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from distill.core.errors import UserError
from distill.core.spec import GRAMMAR
from distill.recipes.scale import RayOptions, parse_shard, ray_options

SPECS = f"{GRAMMAR} (the grammar: docs/inference.md)."
console = Console(stderr=True, soft_wrap=True)  # never hard-wrap messages in logs

# OSError subclasses we raise for missing, existing or unreadable files; ValueError for bad values and formats.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError, UserError)
BUG_ADVICE = "unexpected error (traceback above): it is a bug, please report it with the traceback and the command."
MEMORY_ADVICE = "out of memory (traceback above): lower --max-tokens or --batch-size."

# The click that typer runs on: click itself up to typer 0.28, a vendored copy (typer._click) from 0.29. Its usage
# errors must pass through to click's own handler whichever it is, so take the classes from typer, never `import click`.
_click = sys.modules[next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException").__module__]
CLICK_SIGNALS = (typer.Exit, typer.Abort, *(getattr(_click, n) for n in ("ClickException", "Exit", "Abort") if hasattr(_click, n)))


def out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA or MPS), or an allocator's "out of memory" RuntimeError."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


class Commands(TyperGroup):
    """A Typer group that applies the error policy to every command it runs."""

    def invoke(self, ctx: typer.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except CLICK_SIGNALS:
            raise
        except USER_ERRORS as e:
            if ctx.find_root().params.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {escape(str(e))}")  # messages name files and specs: no markup in them
            raise typer.Exit(2) from None
        except Exception as e:
            if ctx.find_root().params.get("debug"):
                raise
            traceback.print_exc()
            console.print(f"[bold red]error:[/] {MEMORY_ADVICE if out_of_memory(e) else BUG_ADVICE}")
            raise typer.Exit(1) from None


def task_list(tasks: str | None) -> list[str] | None:
    """``pfam,scope`` -> ["pfam", "scope"]; None (every head) when not given."""
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


def not_an_option(value: str | None) -> str | None:
    """Click takes the next word as an option's value even when it is an option (`--ray -o out.tsv`): refuse that."""
    if value is not None and value.startswith("-"):
        raise typer.BadParameter(f"needs a value, got the option {value!r}")
    return value


# Declared once for every command that runs a model (fit's own take None: its values may come from a config file).
TargetPrecision = Annotated[float, typer.Option(help="The no-call threshold is set for this precision on held-out scores + negatives.")]  # fmt: skip
Confidence = Annotated[float, typer.Option(help="The threshold's precision must hold as a one-sided Clopper-Pearson lower bound at this level (0: point).")]  # fmt: skip
MaxTokens = Annotated[int, typer.Option(help="Token budget of one forward pass (residues + 2 per sequence); lower it to use less memory.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda; bf16 autocast on CUDA.")]

# Scaling out (distill.recipes.scale): the same four options on annotate, teacher-cache and index.
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray",
        callback=not_an_option,
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


@dataclass(frozen=True)
class ScaleOut:
    """The scale-out options as one value: the Ray pool (None: this process), the shard, threads per model copy."""

    ray: RayOptions | None
    shard: tuple[int, int] | None
    threads: int


def scale_out(
    shard: Shard = None, ray: RayAddress = None, workers: Workers = 1, threads: Threads = 0, gpus_per_worker: GpusPerWorker = 0.0
) -> ScaleOut:
    return ScaleOut(ray_options(ray, workers, threads, gpus_per_worker), parse_shard(shard), threads)


Command = TypeVar("Command", bound=Callable[..., Any])


def grouped(name: str, build: Callable[..., Any]) -> Callable[[Command], Command]:
    """Options declared once for several commands (Typer has no option groups): the parameters of ``build`` stand in
    the command line where the command has its parameter ``name``, and the command receives ``build(**their values)``
    there, so the options are parsed and checked in one place too."""
    group = list(inspect.signature(build, eval_str=True).parameters.values())

    def decorate(command: Command) -> Command:
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        at = [p.name for p in own].index(name)
        # keyword-only (typer passes every value by name): options with and without defaults may then mix in any order
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*own[:at], *group, *own[at + 1 :]]]
        assert len({p.name for p in params}) == len(params), f"{command.__name__}: an option of {build.__name__} is its own too"

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            value = build(**{p.name: kwargs.pop(p.name) for p in group})
            return command(*args, **{name: value}, **kwargs)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}  # evaluated: typer reads them without the module
        return run  # type: ignore[return-value]

    return decorate
