"""`fastddpm <command>`: each command is a module with `add_arguments(parser)` and `run(args)`.

Only the module of the command that runs is imported (`fastddpm --help` imports none), so a
command never pays for another's dependencies. Errors a user can cause (UserError) end in one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# command → (module, one-line help)
COMMANDS = {
    "sample": ("fastddpm.commands.sample", "draw images from a model"),
    "train": ("fastddpm.commands.train", "train a DDPM ε-model (Algorithm 1)"),
    "eval": ("fastddpm.commands.eval",
             "measure a digits model's samples, or any model's bits/dim (--bpd)"),
    "export": ("fastddpm.export.command", "write ONNX / TensorRT artifacts of a model"),
    "bench": ("fastddpm.commands.bench", "time the sampling loop of a model, per backend"),
    "convert": ("fastddpm.commands.convert",
                "convert models from / to diffusers and the original DDPM checkpoints"),
    "tune-steps": ("fastddpm.commands.tune_steps", "tune a model's time grid for a sampler and step count"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full arguments of `command` alone (the others: name and help)."""
    parser = _Parser(prog="fastddpm", description="A fast runtime for DDPM diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except UserError as e:
        sys.stderr.write(f"fastddpm {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fastddpm: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
