"""`posttrain` on the command line: each subcommand is a plain function whose typed signature and
docstring are its options (jsonargparse). `--config FILE.yaml` sets any option; later flags win."""

from __future__ import annotations

import sys


def commands() -> dict:
    # Imported here so that `import posttrain` stays light.
    from posttrain.chat import chat_command
    from posttrain.data.inspect import inspect_command
    from posttrain.generate import generate_command
    from posttrain.serve import serve_command
    from posttrain.train.sft import sft
    from posttrain.weights.export import export_command

    return {
        "sft": sft,
        "data": {"inspect": inspect_command},
        "generate": generate_command,
        "chat": chat_command,
        "serve": serve_command,
        "export": export_command,
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = sys.argv[1:] if argv is None else argv
    try:
        CLI(commands(), args=argv, as_positional=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
