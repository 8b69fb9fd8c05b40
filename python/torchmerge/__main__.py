"""python3 -m torchmerge ARGS: runs the torchmerge program (found as torchmerge.find_cli does) with
ARGS, replacing this process, so exit codes, signals and the terminal behave as the program's."""
import os
import sys


def main():
    from ._lib import TorchmergeError, find_cli
    try:
        cli = find_cli()
    except TorchmergeError as err:
        sys.stderr.write("torchmerge: error: %s\n" % err)
        return 1
    os.execv(cli, [cli] + sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
