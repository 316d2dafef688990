"""The FL baselines as a user runs them from a scenario file: server optimizers (their state checkpointed and
resumed exactly) and FedProx."""

import json

import pytest
from stopping import StopAt

from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("opt", ["fedadam", "fedyogi"])
def test_a_server_optimizer_runs_checkpoints_and_resumes_exactly(tiny_raw, tmp_path, opt):
    tiny_raw.update(rounds=3, strategy={"name": "fedit", "server_optimizer": {"name": opt, "lr": 0.01}})
    sc = scenario_from_dict(tiny_raw)
    whole = run_scenario(sc, tmp_path / "whole")
    plain = run_scenario(scenario_from_dict(tiny_raw, ["strategy.server_optimizer=null"]), tmp_path / "plain")
    assert whole["final/eval/loss"] != plain["final/eval/loss"]  # the optimizer changes the trajectory
    meta = json.loads((tmp_path / "whole" / "checkpoint" / "meta.json").read_text())
    stage = meta["strategy_state"]["__stages__"]["1"]
    assert stage["t"] == 3 and all("__tensor__" in v for v in stage["m"].values())
    with pytest.raises(RuntimeError, match="stopped"):
        run_scenario(sc, tmp_path / "cut", callbacks=[StopAt(3)])
    resume_run(tmp_path / "cut")  # m, v and t come back from the checkpoint of round 2
    a, b = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    for k in ("train/loss", "eval/loss", "eval/accuracy", "server_opt/step_norm"):
        assert a[-1][k] == b[-1][k], k


def test_fedprox_at_mu_0_is_fedit_and_pulls_towards_the_global_model_above(tiny_raw, tmp_path):
    plain = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "fedit")
    prox = {"name": "fedprox", "params": {"mu": 0.0}}
    zero = run_scenario(scenario_from_dict(tiny_raw, [f"strategy.client_objective={json.dumps(prox)}"]),
                        tmp_path / "zero")
    a, b = _rows(tmp_path / "fedit"), _rows(tmp_path / "zero")
    for ra, rb in zip(a, b):
        for k in ("train/loss", "eval/loss", "eval/accuracy"):
            assert ra.get(k) == rb.get(k), (ra["round"], k)
    assert plain["final/eval/loss"] == zero["final/eval/loss"]
    prox["params"]["mu"] = 10.0
    run_scenario(scenario_from_dict(tiny_raw, [f"strategy.client_objective={json.dumps(prox)}"]), tmp_path / "ten")
    far, near = _rows(tmp_path / "zero")[-1], _rows(tmp_path / "ten")[-1]
    assert near["fedprox/distance"] < far["fedprox/distance"]


def test_a_client_objective_is_checked_by_name_and_params(tiny_raw):
    from fedsim.errors import ScenarioError

    tiny_raw["strategy"] = {"name": "fedit", "client_objective": {"name": "fedprux"}}
    with pytest.raises(ScenarioError, match="unknown client objective 'fedprux'.*fedprox"):
        scenario_from_dict(tiny_raw)
    tiny_raw["strategy"]["client_objective"] = {"name": "fedprox", "params": {"mu": -1}}
    with pytest.raises(ScenarioError, match="strategy.client_objective.params: mu must be ≥ 0"):
        scenario_from_dict(tiny_raw)
    tiny_raw["strategy"]["client_objective"] = {"name": "fedprox", "params": {"nu": 1}}
    with pytest.raises(ScenarioError, match="strategy.client_objective.params: .*nu"):
        scenario_from_dict(tiny_raw)


def test_a_checkpoint_older_than_a_new_key_resumes_when_the_key_is_at_its_default(tiny_raw, tmp_path):
    """A scenario key added after a checkpoint was written (server_optimizer, client_objective) does not make the
    checkpoint's scenario 'changed' while it is at its default; set to anything else, it does."""
    import hashlib

    from fedsim.errors import ScenarioError

    tiny_raw.update(rounds=2)
    out = tmp_path / "run"
    run_scenario(scenario_from_dict(tiny_raw), out)
    (out / "summary.json").unlink()
    meta_path = out / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("server_optimizer", "client_objective"):  # as a checkpoint written before these keys existed
        del meta["provenance"]["scenario"]["strategy"][key]
    meta.pop("meta_digest")
    meta["meta_digest"] = hashlib.sha256(json.dumps(meta, indent=1).encode()).hexdigest()
    meta_path.write_text(json.dumps(meta, indent=1))
    assert resume_run(out)["final/eval/accuracy"] is not None  # nothing to run again: accepted
    text = (out / "scenario.yaml").read_text()
    (out / "scenario.yaml").write_text(text.replace("server_optimizer: null", "server_optimizer: {name: fedadam}"))
    (out / "summary.json").unlink()
    with pytest.raises(ScenarioError, match="strategy.server_optimizer"):
        resume_run(out)


def test_the_recipe_runs_from_a_scenario_and_logs_its_learning_rate(tiny_raw, tmp_path):
    from fedsim.client.schedule import lr_factor, round_lr

    tiny_raw.update(rounds=3)
    tiny_raw["training"].update(local_steps=4, lr_schedule="cosine", warmup_ratio=0.25, round_lr_schedule="cosine",
                                min_lr=0.0, grad_accum_steps=2, gradient_checkpointing=True)
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "recipe")
    rows = [r for r in _rows(tmp_path / "recipe") if "train/lr" in r]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:  # every client runs the same 4 steps: the mean of the within-round schedule at the round's lr
        expected = round_lr(sc.training, r["round"], 3) * sum(lr_factor(sc.training, s, 4) for s in range(4)) / 4
        assert r["train/lr"] == pytest.approx(expected)
        assert r["train/steps"] == 4
    assert rows[0]["train/lr"] > rows[1]["train/lr"] > rows[2]["train/lr"] > 0
    plain = run_scenario(scenario_from_dict(tiny_raw, ["training.lr_schedule=constant", "training.warmup_ratio=0",
                                                       "training.round_lr_schedule=constant"]), tmp_path / "plain")
    assert "train/lr" not in _rows(tmp_path / "plain")[-1]
    assert plain["final/eval/loss"] != _rows(tmp_path / "recipe")[-1]["eval/loss"]


@pytest.mark.usefixtures("shared_ray")
def test_scaffold_from_a_scenario_doubles_communication_resumes_exactly_and_runs_on_ray(tiny_raw, tmp_path):
    tiny_raw.update(rounds=3)
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "fedit")
    tiny_raw["strategy"] = {"name": "fedit", "client_objective": {"name": "scaffold"}}
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "whole")
    plain, rows = _rows(tmp_path / "fedit"), _rows(tmp_path / "whole")
    for p, r in zip(plain[1:], rows[1:]):  # c travels down with the adapter, Δc_i up with the update
        assert r["comm/up_params"] == 2 * p["comm/up_params"] and r["comm/down_params"] == 2 * p["comm/down_params"]
        assert r["scaffold/c_norm"] > 0
    assert rows[1]["scaffold/correction_norm"] == 0 < rows[2]["scaffold/correction_norm"]  # c = c_i = 0 at first
    assert rows[-1]["eval/loss"] != plain[-1]["eval/loss"]
    with pytest.raises(RuntimeError, match="stopped"):
        run_scenario(sc, tmp_path / "cut", callbacks=[StopAt(3)])
    resume_run(tmp_path / "cut")  # c from the server's checkpoint, each c_i from the client state store
    keys = ("train/loss", "eval/loss", "scaffold/c_norm", "scaffold/correction_norm", "scaffold/delta_c_norm")
    for k in keys:
        assert _rows(tmp_path / "cut")[-1][k] == rows[-1][k], k
    ray = scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.server.num_cpus=0.5",
                                        "resources.clients_per_pass=2"])
    run_scenario(ray, tmp_path / "ray")  # the server, with c, in an actor of its own; clients in worker actors,
    # asked to pack, train one by one (SCAFFOLD does not pack) with the same numbers
    for a, b in zip(rows, _rows(tmp_path / "ray")):
        for k in (*keys, "comm/up_params", "comm/down_params"):
            assert a.get(k) == b.get(k), (a["round"], k)


@pytest.mark.parametrize("strategy, sets, match", [
    ("flora", [], "strategy 'flora' does not keep one set of averaged factors.*fedit, ffa, fedsa"),
    ("hetlora", [], "strategy 'hetlora' does not keep"),
    ("pf2lora", ["eval.local_test_fraction=0.2"], "strategy 'pf2lora' trains with a procedure that takes no client"),
])
def test_scaffold_is_refused_where_it_does_not_compose(tiny_raw, strategy, sets, match):
    from fedsim.errors import ScenarioError

    tiny_raw["strategy"] = {"name": strategy, "client_objective": {"name": "scaffold"}}
    with pytest.raises(ScenarioError, match=f"strategy.client_objective: {match}"):
        scenario_from_dict(tiny_raw, sets)
    tiny_raw["strategy"] = {"name": "fedit", "client_objective": {"name": "scaffold", "params": {"server_lr": 0}}}
    with pytest.raises(ScenarioError, match=r"server_lr \(η_g, the global step size\) must be in"):
        scenario_from_dict(tiny_raw)
