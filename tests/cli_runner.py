"""Run the ``sparsetrace`` command line in the test process (shared by the CLI tests)."""

from __future__ import annotations

import sys


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``sparsetrace ARGS`` through ``cli.main`` (the one-line error handling included); (exit code, stdout,
    stderr)."""
    from sparsetrace import cli as cli_mod

    old = sys.argv
    sys.argv = ["sparsetrace", *map(str, args)]
    code = 0
    try:
        cli_mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
