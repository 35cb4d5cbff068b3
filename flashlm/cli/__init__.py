"""The `flashlm` command line (click). Flag letters follow llama.cpp's tools.

Every user error ends as one line on stderr, `flashlm: error: ...`, never a traceback (--verbose shows it), with
exit status 2: bad flags or option values, an impossible memory budget, a prompt longer than the context, an output
that exists without --force, a missing, unreadable, malformed or unsupported model or input file. Exit status 1 is
for failures while running (storage failing under a loaded model, a template that does not render, out of memory,
an output that cannot be written), 130 for Ctrl-C. With --json, stdout gets one JSON document on success and
nothing on failure.
"""

from __future__ import annotations

import sys

import click

from flashlm.cli import bench, run, serve, store, train  # noqa: F401  (they register their commands)
from flashlm.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    _exit_code,
    _fail,
    cli,
    error_message,
    foreign_flag,
)


def main(argv=None) -> None:
    from flashlm.errors import FlashLMError

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    foreign = foreign_flag(argv)
    if foreign:
        _fail(foreign)
    try:
        cli.main(args=argv, prog_name="flashlm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.ClickException as e:  # bad flags: one line, exit 2
        if verbose:
            raise
        _fail(e.format_message().replace("\n", " "))
    except FlashLMError as e:
        if verbose:
            raise
        _fail(error_message(e), _exit_code(e))
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        if verbose:
            raise
        _fail("out of memory (a --memory-budget makes flashlm stream what does not fit)", EXIT_RUNTIME)
    except OSError as e:  # e.g. an output path that cannot be written
        if verbose:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(f"{where}{e.strerror or e}", EXIT_RUNTIME)
