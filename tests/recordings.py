"""The `batchmon record` recordings kept as test fixtures, read one way (tests/fixtures/*.jsonl.gz)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
FAST16_15S = FIXTURES / "fast16_h200_15s.jsonl.gz"  # 16 MLP jobs on the H200, past their first minute
FAST16_GROWTH = FIXTURES / "fast16_h200_50s_growth.jsonl.gz"  # the same jobs 10-60 s old: summaries still growing


def read_records(path: Path) -> list[dict]:
    """Every record of a gzipped recording, in order (a fresh list each call: tests may change them)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
