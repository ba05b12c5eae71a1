"""``python -m pserv ARGS``: the ``pserv`` command line, run by the engine this package
carries (no separate executable needed). ``pserv local`` started this way starts its
scheduler, servers and workers as ``python -m pserv ROLE ...`` with this interpreter."""

import os
import sys

from . import _pserv


def main() -> int:
    """Run the command line on ``sys.argv[1:]``; returns the exit status."""
    os.environ.setdefault("PSERV_SELF_EXE", sys.executable)
    return int(_pserv._run_cli(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
