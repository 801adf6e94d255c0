"""Run the real monitor in a terminal on fixture Snapshots (for the tmux test): `python tests/tui_fixture_app.py`.

Exits with run_monitor's exit code, so a test can check that `q` ends it cleanly.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tui_fixtures as fx  # noqa: E402
from batchmon.tui.app import run_monitor  # noqa: E402
from list_source import ListSource  # noqa: E402


def main() -> int:
    source = ListSource(fx.series(20, n_agents=2), interval=0.25, loop=True)
    return run_monitor(source, interval=0.25, mouse=False, title="fixture")


if __name__ == "__main__":
    sys.exit(main())
