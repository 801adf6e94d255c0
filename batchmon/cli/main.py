"""The `batchmon` command: argparse for every subcommand; each handler lives in its own module, imported lazily
so that `batchmon --once` never pays for Textual and nothing here ever imports torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from batchmon import __version__
from batchmon.errors import CliError

DESCRIPTION = """\
Where does my GPU memory go, and what batch size will fit?

Run `batchmon` in a second terminal to watch every GPU and every training process that has the agent
attached (`batchmon.attach(model, optimizer)` in the script, or `batchmon run -- python train.py`).
"""

EPILOG = """\
examples:
  batchmon                                   live monitor (Textual app)
  batchmon --once                            one snapshot as a table, then exit
  batchmon --once --json                     one snapshot as JSON (schema in README)
  batchmon run -- python train.py --lr 3e-4  run a training command with the agent attached
  batchmon record -o run.jsonl               record everything the monitor sees
  batchmon replay run.jsonl --speed 4        replay a recording in the monitor
  batchmon predict --params 125M --layers 12 --hidden 768 --input-dim 1024 --batch 32 --optimizer adam
  batchmon demo                              a small real training run, shown in the monitor
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


MAX_INTERVAL_S = 3600.0  # an hour between refreshes; beyond that timers overflow (1e300 s) and nothing is shown


def _interval(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_INTERVAL_S:g} seconds, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {text!r}")
    return value


def _add_monitor_options(p: argparse.ArgumentParser, *, remote_hosts: bool = True) -> None:
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="refresh interval of probes and screen (default: 1.0)")
    if remote_hosts:
        p.add_argument("--host", action="append", default=[], metavar="HOST",
                       help="also show a remote box through `ssh HOST batchmon stream` (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchmon", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"batchmon {__version__}")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="with --once: print JSON instead of a table")
    parser.add_argument("--no-mouse", action="store_true", help="do not capture the mouse in the monitor")
    _add_monitor_options(parser)
    parser.set_defaults(handler="batchmon.cli.monitor:main")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a Python training command with the agent attached (no code change)",
                       description="Run CMD with the batchmon agent attached to every Python process it starts. "
                                   "stdin/stdout/stderr, signals and the exit code pass through unchanged.")
    importlib.import_module("batchmon.cli.run").add_arguments(p)
    p.set_defaults(handler="batchmon.cli.run:main")

    p = sub.add_parser("record", help="record every hub input as JSON lines",
                       description="Write everything the monitor sees (NVML and host samples, agent messages) "
                                   "to FILE as JSON lines, flushed per line. Stop with Ctrl-C.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write ('-' for stdout)")
    p.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="stop after this long")
    _add_monitor_options(p, remote_hosts=False)  # records this box; run it on the remote box for that one
    p.set_defaults(handler="batchmon.monitor.recorder:main_record")

    p = sub.add_parser("stream", help="write every hub input to stdout as JSON lines (used by --host)")
    p.add_argument("--duration", type=_positive_float, metavar="SECONDS", help="stop after this long")
    _add_monitor_options(p, remote_hosts=False)
    p.set_defaults(handler="batchmon.monitor.recorder:main_stream")

    p = sub.add_parser("replay", help="drive the monitor from a recording",
                       description="Open the monitor on a recording made by `batchmon record`.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--speed", type=_positive_float, default=1.0, help="playback speed factor (default: 1)")
    p.add_argument("--from-start", action="store_true",
                   help="start at the recording's first line (default: when the first training process said hello); "
                        "keys: left/right seek 10 s, home/end")
    p.add_argument("--once", action="store_true", help="print the final snapshot of the recording and exit")
    p.add_argument("--json", action="store_true", help="with --once: print JSON")
    p.add_argument("--no-mouse", action="store_true", help="do not capture the mouse")
    p.set_defaults(handler="batchmon.cli.monitor:main_replay")

    p = sub.add_parser("predict", help="the memory equation as a calculator, no GPU needed",
                       description="Estimate training memory from closed forms: parameters N*b, gradients N*b, "
                                   "optimizer states k*N*b, batch B*D*b; activations per transformer layer "
                                   "s*B*h*(34+5*a*s/h) with --heads/--seq-len, else B*L*H*b (a lower bound).")
    p.set_defaults(handler="batchmon.cli.predict:main")
    from batchmon.cli.predict import add_arguments  # no torch, no textual: plain argparse

    add_arguments(p)

    p = sub.add_parser("demo", help="a real small training run with the agent attached, shown in the monitor")
    p.add_argument("--steps", type=_non_negative_int, default=0,
                   help="training steps (default 0: run until the monitor quits)")
    p.add_argument("--no-mouse", action="store_true", help="do not capture the mouse")
    p.set_defaults(handler="batchmon.cli.demo:main")

    p = sub.add_parser("export", help="serve metrics for Prometheus")
    p.add_argument("--prometheus", action="store_true", required=True, help="Prometheus text format over HTTP")
    p.add_argument("--bind", dest="bind", default="127.0.0.1", metavar="ADDR",
                   help="address to serve on (default: 127.0.0.1, loopback only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=9400, help="port (default: 9400)")
    _add_monitor_options(p, remote_hosts=False)  # one exporter per box; --host means a remote box everywhere
    p.set_defaults(handler="batchmon.monitor.export:main")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps its subparsers here; no public accessor
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported with the usage of the subcommand it was given to
    (`batchmon demo --bogus` printed the top-level usage)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "command", None)
        sub = _subparser(parser, command)
        if command == "export" and "--host" in extra:
            sub.error("--host is the remote-box option; the address export listens on is --bind ADDR")
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _ClosedStdout:
    """Stands in for sys.stdout when the process started with it closed (`>&-`): the first write is one line
    on stderr and exit code 1, not an AttributeError on None."""

    def write(self, text: str) -> int:
        raise CliError("cannot write the output: stdout is closed")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(9, "stdout is closed")


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's last flush (of output a reader no longer takes, or a full
    disk does not) neither fails nor prints "Exception ignored"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _flush_output() -> int | None:
    """Flush stdout now; an error is one line (exit 1), a closed pipe a quiet end (exit 0). None when fine."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as exc:
        _silence_stdout()
        print(f"batchmon: error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except CliError:
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()  # type: ignore[assignment]
    try:
        return _main(argv)
    except CliError as exc:  # from parsing: --version or --help into a closed stdout
        print(f"batchmon: error: {exc}", file=sys.stderr)
        return exc.code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if args.json and not args.once:
        parser.error("--json needs --once")
    module_name, _, func_name = args.handler.partition(":")
    try:
        try:
            handler = getattr(importlib.import_module(module_name), func_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise CliError(f"'{args.command}' is not available in this version of batchmon") from None
        code = int(handler(args) or 0)
        flushed = _flush_output()
        return code if flushed is None else (flushed if code == 0 else code)
    except CliError as exc:
        print(f"batchmon: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as exc:  # what no handler expected (a full disk under stdout): one line, not a traceback
        _silence_stdout()
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"batchmon: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
