"""The ``vitlab`` command: parses arguments, calls the Python API, formats output and errors.

The commands live in :mod:`vitlab.cli.commands`; this module only runs them, so ``vitlab --version`` answers
without importing torch. A :class:`~vitlab.errors.VitlabError` is printed in one or two lines and exits with
status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from vitlab._version import __version__
from vitlab.errors import VitlabError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlab`` console script and ``python -m vitlab``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:  # before the commands (and torch) are imported
        print(f"vitlab {__version__}")
        return 0
    from vitlab.cli.commands import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return int(func(args) or 0)
    except VitlabError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (a full disk, a read-only folder): its message names the path
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
