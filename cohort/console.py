"""The ``refine-more`` console script: the method's commands and the cohort's in one parser.

Each module named in :data:`COMMAND_MODULES` defines ``add_commands(subparsers)``; a module with
new commands is added here, one line (see :mod:`refine_more.cli`).
"""
from __future__ import annotations

import sys

from refine_more import cli as method_cli

COMMAND_MODULES = (
    "refine_more.cli",      # simulate, validate, fit, recon
    "refine_more.describe",  # describe
    "refine_more.reconstruction.synthesis",  # synthesize
    "cohort.cli",           # cohort run, demo
    "cohort.report",        # report (rebuild the HTML reports of a folder)
    "refine_more.files.interop.cli",  # import refine-more-mat|ismrmrd, export ismrmrd|bids
)


def main(argv=None) -> int:
    return method_cli.main(argv, COMMAND_MODULES)


if __name__ == "__main__":
    sys.exit(main())
