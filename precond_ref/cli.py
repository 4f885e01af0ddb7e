"""The command line: ``python -m precond_ref <command>`` (also installed as ``precond-ref``).

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this module only dispatches, so ``--help`` stays fast and a missing optional dependency of one
command does not break the others. Errors a user can cause (bad flags, unknown names, unwritable
paths) end with a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

# command name -> (module, one-line help, the pip extra that installs what the command needs)
COMMANDS = {
    "compare": ("precond_ref.compare", "train small models on real data with every optimizer and compare", "compare"),
    "bench": (
        "precond_ref.benchmarks",
        "training-step and optimizer-step time and state memory of every method, as ratios to AdamW / Adam",
        "compare,torch",
    ),
    "trace": ("precond_ref.testing", "export a reference trajectory of one method on a standard problem", "numpy"),
    "reproduce": ("precond_ref.compare.reproduce", "check each paper's headline claims: the paper's figure, ours, a verdict", "compare,torch"),
}


def pip_install(extras: str) -> str:
    """The command that installs the package with ``extras`` (e.g. ``"compare,torch"``) from a
    checkout of its repository, the one place it is installed from."""
    return f'pip install -e ".[{extras}]" (from a checkout of precond_ref)'


def install_hint(command: str) -> str:
    """:func:`pip_install` of a command's extras (what its error messages tell the user)."""
    return pip_install(COMMANDS[command][2])


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


def rewrite_sections(pages: Sequence[tuple], replace: Callable[[str, str], str]) -> None:
    """Write each ``(path, section)`` of ``pages`` into its file, in place of the section the
    file holds (``replace(text, section)``); a file without one is a :class:`UserError`."""
    for path, section in pages:
        with open(path) as handle:
            text = handle.read()
        try:
            text = replace(text, section)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
        with open(path, "w") as handle:
            handle.write(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="precond-ref",
        description="Reference implementations of nine structured preconditioned optimizers. Commands: "
        + ", ".join(COMMANDS) + ".",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, help_text, _) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            # Say what to install, for --help and for any arguments (not "unrecognized arguments").
            command_parser.description = f"{help_text}. Not available here ({err}): {install_hint(name)}"
            command_parser.set_defaults(_import_error=err)
            continue
        if not hasattr(module, "add_arguments"):
            continue
        module.add_arguments(command_parser)
        modules[name] = module
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # what a first try without arguments needs is the help, not an error
        parser.print_help()
        return 0
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "_import_error", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv[1:]  # the command's own arguments, for the record in its output
    if getattr(args, "_import_error", None) is not None:
        print(
            f"precond-ref {args.command}: missing dependency ({args._import_error}); install it with: "
            f"{install_hint(args.command)}",
            file=sys.stderr,
        )
        return 2
    if args.command not in modules:
        print(f"precond-ref: the {args.command!r} command is not available in this version", file=sys.stderr)
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as err:
        print(f"precond-ref {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
