"""bench/sweep.py as a user runs it: it builds its fleet, times the three kinds of sweep, drops its schema, ends in JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from tests.support.postgres import PG_ADMIN_URL
from tests.support.scripts import ROOT


def _schemas() -> set[str]:
    eng = sa.create_engine(PG_ADMIN_URL)
    try:
        with eng.connect() as c:
            return set(c.scalars(sa.text("select schema_name from information_schema.schemata where schema_name like 'bench_%'")))
    finally:
        eng.dispose()


@pytest.mark.postgres
def test_the_sweep_benchmark_measures_both_engines_and_cleans_up(postgres_url) -> None:
    before = _schemas()
    out = subprocess.run([sys.executable, "bench/sweep.py", "--db", "both", "--nodes", "3000", "--repeats", "2", "--old-chunk", "100",
                          "--pg-url", PG_ADMIN_URL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["db"] for r in summary["results"]] == ["sqlite", "postgresql"]
    for r in summary["results"]:
        assert 400 < r["shops_swept"] < 600  # half the partitions of 1,000 shops
        assert r["statements_chunked"] == -(-r["shops_swept"] // 100) and r["statements_one"] == 1
        assert r["ms_whole"] > 0 and r["ratio_chunked"] == round(r["ms_chunked"] / r["ms_whole"], 2)
    assert _schemas() == before  # its schema dropped
