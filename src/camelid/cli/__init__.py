"""The `camelid` command line: a thin layer over the library, one module per group of verbs.

Each verb module declares its parsers and their handlers; a handler calls the library and prints what it returns.
Options that several verbs take are defined once, in camelid.cli.options. Building the parser loads no torch, so
`camelid --help` and every `camelid VERB --help` answer without it.
"""

import argparse
import sys

from camelid.cli.cost import add_cost
from camelid.cli.data import add_data
from camelid.cli.eval import add_eval
from camelid.cli.export import add_export
from camelid.cli.run import add_chat, add_convert, add_generate, add_models, add_quickstart
from camelid.cli.serve import add_serve
from camelid.cli.train import add_train
from camelid.errors import CamelidError

# Each verb's parser, in the order `camelid --help` lists them.
VERBS = (add_models, add_chat, add_generate, add_convert, add_train, add_quickstart, add_cost, add_serve, add_export,
         add_data, add_eval)
LONG_RUNNING = ("data", "eval")  # verbs that SIGTERM interrupts as Ctrl-C does


class Parser(argparse.ArgumentParser):
    """argparse reporting a usage mistake as camelid reports any other: one line, then exit status 2."""

    def error(self, message):
        self.exit(2, f"camelid: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="camelid", description="Make your own chat assistant from an open LLaMA-family model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in VERBS:
        add(sub)
    return parser


def _interrupt_on_sigterm() -> None:
    """`kill` stops a long data or eval run as Ctrl-C does: what it wrote stays and its report is saved."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in LONG_RUNNING:
        _interrupt_on_sigterm()
    try:
        args.func(args)
    except CamelidError as exc:
        print(f"camelid: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
