"""``python -m worker --level LEVEL``: the same as ``tetrarch worker``."""

import sys

from tetrarch_cli.main import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
