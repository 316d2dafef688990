"""Packed clients end to end: the quickstart's accuracy curve with and without packing, packing on the Ray backend,
and the one-time note when a strategy's clients cannot be packed."""

from __future__ import annotations

import json

import pytest
from tolerances import F32_NETWORK

from fedsim.config import load_scenario, scenario_from_dict
from fedsim.driver import run_scenario

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/up_params", "comm/down_params", "clients/succeeded")


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_packed_follows_the_unpacked_accuracy_curve(tmp_path):
    common = ["resources.backend=local", "logging.wandb.mode=disabled", "logging.console=false"]
    one = run_scenario(load_scenario("scenarios/quickstart.yaml", common), tmp_path / "one")
    packed = run_scenario(load_scenario("scenarios/quickstart.yaml", common + ["resources.clients_per_pass=5"]),
                          tmp_path / "packed")
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "packed")
    assert len(a) == len(b) == 11
    for ra, rb in zip(a, b):  # within one test example (1/400) per evaluation
        assert abs(ra["eval/accuracy"] - rb["eval/accuracy"]) <= 1 / 400 + 1e-9, ra["round"]
    # 5 clients a round over the quickstart's 2 workers: packs of 2 and 3
    assert all(r["train/clients_per_pass"] == 2.6 for r in b[1:]) and all(r["train/clients_per_pass"] == 1 for r in a[1:])
    assert b[1]["train/loss"] == pytest.approx(a[1]["train/loss"], rel=F32_NETWORK)
    assert one["final/eval/accuracy"] > 0.5 and packed["final/eval/accuracy"] > 0.5
    # the exported adapter is PEFT's format either way
    from peft import PeftModel

    from fedsim.models.base import build_base_model

    sc = load_scenario("scenarios/quickstart.yaml")
    model = PeftModel.from_pretrained(build_base_model(sc.model), str(tmp_path / "packed" / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0) > 0


@pytest.mark.usefixtures("shared_ray")
def test_packs_on_ray_equal_packs_in_process_with_merges_and_mixed_ranks(tiny_raw, tmp_path):
    tiny_raw["strategy"] = {"name": "flora"}
    tiny_raw["clients"].update(per_round=5, lora={"tiers": [{"fraction": 0.5, "rank": 2},
                                                            {"fraction": 0.5, "rank": 6, "alpha": 3}]})
    tiny_raw["resources"]["clients_per_pass"] = 4
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    # on Ray the workers fold their packs' updates into partials: equal to float32 rounding (FLoRA's dense sums)
    ray_sum = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.worker_partials=true"]),
                           tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for ra, rb in zip(a, b):  # the packs are cut from the job list alone: the same on both backends
        for k in COMPARED:
            assert ra.get(k) == rb.get(k) or ra.get(k) == pytest.approx(rb.get(k), rel=F32_NETWORK), (ra["round"], k)
        assert rb.get("engine/server_in_objects", 0) <= 2  # one partial per worker
    # 5 clients, K = 4, 2 workers: two packs (one per worker), of 2 and 3 clients
    assert {r["train/clients_per_pass"] for r in a[1:] + b[1:]} == {(2 * 2 + 3 * 3) / 5}
    assert sum(w["num_clients"] for w in ray_sum["workers"]) == 10
    assert all(w["num_clients"] > 0 for w in ray_sum["workers"])
    assert local["final/eval/loss"] == pytest.approx(ray_sum["final/eval/loss"], rel=F32_NETWORK)


def test_unpackable_clients_train_one_by_one_with_a_note_once(tiny_raw, tmp_path):
    tiny_raw["strategy"] = {"name": "feddpa"}
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    tiny_raw["resources"]["clients_per_pass"] = "auto"
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    notes = [n for r in rows for n in r.get("notes", ())]
    assert len(notes) == 1 and "one by one" in notes[0] and "alternate" in notes[0]
    assert all(r["train/clients_per_pass"] == 1 for r in rows[1:])
    said = json.loads((tmp_path / "run" / "summary.json").read_text())["notes"]
    assert [n for n in said if not n.startswith("aggregation: ")] == notes  # and the path auto took, said at start
