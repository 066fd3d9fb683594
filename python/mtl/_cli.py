"""The `mtl` command installed by the package: the same command line as the Rust binary, run in-process."""

import signal
import sys

from . import _native


def main() -> None:
    # The command line handles Ctrl-C itself (training finishes its step and writes a checkpoint first), as the
    # binary does: Python's own handler would only set a flag that no Python code is left to look at.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.cli(["mtl", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
