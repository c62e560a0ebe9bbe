"""The `pixal3d` command. Each subcommand lives in the module that does the work; this file only dispatches, and
imports lazily so that `pixal3d keys` or `pixal3d --help` start instantly without loading torch."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "generate": ("pixal3d_backend.service", "generate_main", "image -> textured GLB, in this process"),
    "serve": ("pixal3d_backend.server", "serve_main", "run the warm backend server for the Blender add-on"),
    "keys": ("pixal3d_backend.server", "keys_main", "create CurveZMQ keys for a remote server or its clients"),
    "weights": ("pixal3d_backend.weights", "main", "`weights download`: fetch the official weights (network)"),
    "bench": ("pixal3d_backend.bench", "main", "GPU benchmark of the full-size architecture"),
    "eval": ("pixal3d_backend.evaluation", "main", "evaluate a model on the held-out procedural set"),
}


def usage() -> str:
    lines = ["usage: pixal3d <command> [options]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`pixal3d <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pixal3d: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "weights":
        if not rest or rest[0] != "download":
            print("usage: pixal3d weights download [--repo-id ID] [--revision REV] [--no-helpers]", file=sys.stderr)
            return 2
        rest = rest[1:]
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
