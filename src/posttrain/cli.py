"""`posttrain` on the command line: each subcommand is a plain function whose typed signature and
docstring are its options (jsonargparse). `--config FILE.yaml` sets any option; later flags win.

Exit codes: 0 done; 1 a usage or data problem that posttrain reports in one line on stderr (bad
data, unknown choice, unwritable or occupied output directory; set POSTTRAIN_TRACEBACK=1 for the
traceback); 2 options that do not parse; 128 + N training stopped by signal N after saving a
checkpoint (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType


def commands() -> dict:
    # Imported here so that `import posttrain` stays light.
    from posttrain.chat import chat_command
    from posttrain.data.inspect import inspect_command
    from posttrain.eval.commands import eval_commands
    from posttrain.generate import generate_command
    from posttrain.lora import merge_command
    from posttrain.predict import predict_command
    from posttrain.report_html import report_command
    from posttrain.serve import serve_command
    from posttrain.synth.preferences import synth_preferences
    from posttrain.train.classify import classify
    from posttrain.train.dpo import dpo
    from posttrain.train.sft import sft
    from posttrain.weights.export import export_command

    return {
        "sft": sft,
        "dpo": dpo,
        "classify": classify,
        "predict": predict_command,
        "data": {"inspect": inspect_command},
        "synth": {"preferences": synth_preferences},
        "generate": generate_command,
        "chat": chat_command,
        "serve": serve_command,
        "export": export_command,
        "merge": merge_command,
        "eval": eval_commands(),
        "report": report_command,
    }


def run(argv: list[str]):
    """Parse `argv` and call the subcommand it names; returns what the subcommand returns."""
    from jsonargparse import CLI

    from posttrain.predict import positional_text_argv
    from posttrain.report_html import report_argv

    # `posttrain predict RUN "text"` and `posttrain report A B`: jsonargparse makes only required
    # parameters positional, and reads a list positional only as one list
    return CLI(commands(), args=report_argv(positional_text_argv(argv)), as_positional=True)


def parser():
    """The argument parser `posttrain` uses (for tests and tools that check configs)."""
    from jsonargparse import capture_parser

    return capture_parser(lambda: run([]))


def _raised_in_posttrain(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of a traceback is posttrain's own code (a deliberate error with a
    message for the user), not a library's (more likely a bug, where the traceback helps)."""
    package = str(Path(__file__).resolve().parent)
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and str(Path(last.tb_frame.f_code.co_filename).resolve()).startswith(package)


def main(argv: list[str] | None = None) -> None:
    from posttrain.train.loop import TrainingInterrupted

    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except TrainingInterrupted as e:  # the checkpoint is saved; say how to continue
        print(f"\nposttrain: {e} (command line: --train.resume true)", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError) as e:  # DataError, FileExistsError, FileNotFoundError are among these
        # OSErrors name their file; ValueErrors are ours only when posttrain raised them.
        if os.environ.get("POSTTRAIN_TRACEBACK") or not (isinstance(e, OSError)
                                                         or _raised_in_posttrain(e.__traceback__)):
            raise
        print(f"posttrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
