"""`fastddpm <command>`: each command is a module with `add_arguments(parser)` and `run(args)`.

Errors a user can cause (UserError) end in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# command → (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "sample": ("fastddpm.sample_command", "draw images from a model"),
    "train": ("fastddpm.train_command", "train a DDPM ε-model (Algorithm 1)"),
    "eval": ("fastddpm.evaluate", "measure a digits model's samples, or any model's bits/dim (--bpd)"),
    "export": ("fastddpm.export.cli", "write ONNX / TensorRT artifacts of a model"),
    "bench": ("fastddpm.bench", "time the sampling loop of a model, per backend"),
    "convert": ("fastddpm.convert_command",
                "convert models from / to diffusers and the original DDPM checkpoints"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastddpm", description="A fast runtime for DDPM diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        sys.stderr.write(f"fastddpm {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fastddpm: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
