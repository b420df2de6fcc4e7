"""The command line's entry point (`widenet`, `python -m widenet`), free of torch.

The commands live in widenet/cli.py, which imports torch: a second or more on a
cold start. Ctrl-C in that second would otherwise end in Python's own
KeyboardInterrupt traceback; here it ends like Ctrl-C at any later time. This module
and widenet/cli_errors.py import no torch.
"""

from __future__ import annotations

import sys

from .cli_errors import INTERRUPTED


def run() -> None:
    """Run the command line; Ctrl-C before a command starts (while torch loads, or the parser is
    built) ends as it does during one: `widenet: interrupted`, status 130."""
    try:
        from .cli import run as run_command

        run_command()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    run()
