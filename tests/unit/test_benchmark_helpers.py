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
