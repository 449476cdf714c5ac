"""`sasa-triton <command> [args]` (or `python -m sasa_triton <command>`): a small dispatcher.

Each command is a module with a `main(argv) -> int` function, imported only when it is run, so
a command whose module this install lacks reports that instead of breaking the others. A main
that takes `prog` gets "sasa-triton <command>", so that its usage and --help name the command as
it was typed.
"""
from __future__ import annotations

import importlib
import inspect
import sys

COMMANDS = {
    "autotune": ("sasa_triton.autotune", "tune the kernels for this GPU and keep the winners"),
    "bench": ("sasa_triton.bench", "benchmark the kernels against the baselines"),
    "inspect": ("sasa_triton.inspect", "show what the kernels compile to (registers, spills, ...)"),
    "train": ("sasa_triton.train", "train a small SASA ResNet on a generated toy task"),
}


def _usage() -> str:
    lines = ["usage: sasa-triton <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`sasa-triton <command> --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sasa-triton: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"sasa-triton: the {command!r} command is not available in this install ({module_name} is missing)",
              file=sys.stderr)
        return 2
    if "prog" in inspect.signature(module.main).parameters:
        return int(module.main(rest, prog=f"sasa-triton {command}") or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
