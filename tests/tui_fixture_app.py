"""Run the real monitor in a terminal on fixture Snapshots (for the tmux tests): `python tests/tui_fixture_app.py
[hostile]`.

Exits with run_monitor's exit code, so a test can check that `q` ends it cleanly.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tui_fixtures as fx  # noqa: E402
from batchmon.tui.app import run_monitor  # noqa: E402
from list_source import ListSource  # noqa: E402


def main(argv: list[str]) -> int:
    """`hostile`: a snapshot whose every outside string carries terminal escapes (tui_fixtures.hostile)."""
    snaps = [fx.hostile()] * 4 if argv[1:] == ["hostile"] else fx.series(20, n_agents=2)
    source = ListSource(snaps, interval=0.25, loop=True)
    return run_monitor(source, interval=0.25, mouse=False, title="fixture")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
