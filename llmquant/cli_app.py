"""The typer app every command module registers on, and the shared console/error handling."""
from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from llmquant.errors import LLMQuantError

app = typer.Typer(
    name="llmquant",
    help="Quantize large language models: GPTQ, RTN, PTQ, QAT; evaluate and run the results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)      # progress, tables and messages; stdout stays for --json output
out = Console()                     # machine-readable output


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn library errors into one-line messages and a non-zero exit, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMQuantError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: nothing was written[/]")
            raise typer.Exit(130)
        except MemoryError:
            fail("out of memory; lower --nsamples / --seqlen or use a machine with more memory", 3)
    return wrapper
