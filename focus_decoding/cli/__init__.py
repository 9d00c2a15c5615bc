"""`focus-decoding`: the command line. Errors are one line with exit status 2; Ctrl-C is one line and 130.

Example:
    focus-decoding generate "The capital of France is" --max-new-tokens 16
    focus-decoding eval-text --max-uncertain 40 --out runs/smollm2
    accelerate launch -m focus_decoding.cli eval-text --model tiny-llama --out runs/tiny

Read top-down: ``main`` (here: signals, errors) -> ``parser`` (options, the config) -> one module per
command (``generate``, ``eval_text``, ``eval_vision``, ``tune``, ``export``) -> ``common`` (what every
job shares), ``resumable`` (partial and result files) and ``figures``. This module imports nothing
heavy, so the Ctrl-C handler is in place before torch and transformers load.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``focus-decoding``; returns the exit status (2 for bad input, 130 when interrupted)."""
    loading = threading.Event()
    loading.set()
    previous = _install_handlers(loading)  # before the heavy imports: Ctrl-C while importing is one line, 130
    try:
        return _run(argv, loading)
    finally:
        for signum, handler in previous.items():  # a caller in the same process gets its own handlers back
            signal.signal(signum, handler)


def _run(argv: Sequence[str] | None, loading: threading.Event) -> int:
    from . import parser as cli_parser

    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
    try:
        import torch

        parser = cli_parser.build_parser()
        loading.clear()  # from here on Ctrl-C is a KeyboardInterrupt the jobs turn into saved partial results
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse already printed its one-line usage error
            return int(exc.code or 0)
        command = args.command
        from .common import world_size

        if world_size() > 1 and args.device.startswith("cpu"):
            os.environ["ACCELERATE_USE_CPU"] = "1"  # gather over gloo on CPU even where CUDA exists
        if args.command in cli_parser.TOOLS:
            return cli_parser.TOOLS[args.command][0].run(args)
        config = cli_parser.config_from_args(args)
        torch.manual_seed(args.seed)
        return cli_parser.JOBS[args.command][0].run(args, config)
    except KeyboardInterrupt:  # Ctrl-C outside the evaluation loop (which saves its windows and says so itself)
        _error(command, "interrupted")
        return 130
    except (ValueError, OSError) as exc:  # CliError, FocusConfig, missing files, hub offline: the user's to fix
        _error(command, f"error: {exc}")
        return 2


def _error(command: str, message: str) -> None:
    """One line on stderr, whatever the source message looks like; under a launcher only the first process says it
    (every process exits with the same status)."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"focus-decoding {command}: {' '.join(message.split())}".replace("  ", " "), file=sys.stderr)


def _install_handlers(loading: threading.Event) -> dict:
    """SIGINT and SIGTERM: while ``loading``, say so in one line and exit 130 at once (nothing to save yet);
    afterwards raise KeyboardInterrupt, so the jobs keep their partial results. Returns the handlers replaced.
    A SIGINT that the parent ignores (a shell's background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be installed from the main thread

    def interrupt(signum, frame):
        if loading.is_set():
            sys.stderr.write("focus-decoding: interrupted while starting; nothing was done\n")
            sys.stderr.flush()
            os._exit(130)
        raise KeyboardInterrupt

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if signum == signal.SIGINT and handler == signal.SIG_IGN:
            continue
        previous[signum] = handler if handler is not None else signal.SIG_DFL
        signal.signal(signum, interrupt)
    return previous
