"""The benchmarks' own helpers that read run directories (they run long after a change; a broken one loses hours)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import torch  # noqa: E402


def test_mixed_precision_reads_the_learned_update_of_a_run(tiny_raw, tmp_path):
    import mixed_precision

    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario
    from fedsim.models.base import target_shapes

    tiny_raw.update(rounds=1)
    tiny_raw["strategy"] = {"name": "flora"}  # merges into the base: the base deltas count too
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "run")
    update = mixed_precision.learned_update(tmp_path / "run")
    shapes = target_shapes(sc.model)
    assert set(update) == set(shapes)
    for m, d in update.items():
        assert d.shape == (shapes[m].d_out, shapes[m].d_in) and torch.isfinite(d).all() and d.abs().sum() > 0


def _dies(args, queue):
    raise SystemExit(3)


def test_a_benchmark_child_that_dies_is_an_error_not_a_hang():
    import pytest
    from common import in_subprocess

    with pytest.raises(RuntimeError, match="_dies exited with code 3 without a result"):
        in_subprocess(_dies, ())


def test_peak_rss_is_the_processs_own_not_its_parents():
    """getrusage's ru_maxrss is inherited across fork and exec: a spawned child of a large parent reported the
    parent's peak."""
    import multiprocessing as mp

    from fedsim.runtime.worker import peak_rss_mb

    big = bytearray(1200 * 2**20)
    big[:: 4096] = b"\1" * len(big[:: 4096])  # touch every page
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        child = pool.apply(peak_rss_mb)
    assert peak_rss_mb() > 1200 and child < 900, (peak_rss_mb(), child)
    del big


def test_the_fl_baselines_server_part_runs_and_checks_its_work():
    import fl_baselines

    rows = fl_baselines.server(12)
    assert [r["step"] for r in rows][1:5] == ["fedavgm step", "fedadagrad step", "fedadam step", "fedyogi step"]
    assert all(r["s"] >= 0 and r["clients"] == 12 for r in rows)
