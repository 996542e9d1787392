"""``python -m worker --level LEVEL``: the same as ``tetrarch worker``."""

from tetrarch_cli.main import cli

if __name__ == "__main__":
    cli(["worker", *__import__("sys").argv[1:]])
