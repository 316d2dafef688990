"""Every extension point with a component of the test's own — defined in the test's body, as a user would in a
notebook — on both backends: a strategy, a client objective, a client-side transform, a metric, a server stage with
state that survives a resume, a round callback, a row format; and what each refuses."""

import dataclasses
import json

import pytest
import torch
from stopping import StopAt
from tolerances import F32_NETWORK

from fedsim import registry
from fedsim.components import resolve
from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario
from fedsim.errors import ScenarioError
from fedsim.eval.metrics import Metric
from fedsim.federation.callbacks import RoundCallback
from fedsim.objectives import BoundObjective, ClientObjective
from fedsim.pipeline import ServerStage, StageResult, UpdateTransform
from fedsim.strategies import register
from fedsim.strategies.fedit import FedIT


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _components():
    """A notebook's components: classes defined here, at run time (cloudpickle ships them to Ray by value)."""

    @dataclasses.dataclass(frozen=True)
    class L2Pull(ClientObjective):  # μ/2 ‖θ‖² over the trainable tensors: pulls the update towards zero
        mu: float
        metric_keys = ("reg/l2_end",)
        round_metrics = ("reg/l2_end",)

        def bind(self, params, lora, scaling):
            mu = self.mu

            class Bound(BoundObjective):
                def penalty(self):
                    return mu / 2 * sum((t.float() ** 2).sum() for t in params().values() if t.requires_grad)

                def finish(self):
                    with torch.no_grad():
                        return {"reg/l2_end": float(self.penalty())}

            return Bound()

    @register("notebook_fedit")
    class NotebookFedIT(FedIT):  # FedIT whose clients also minimise L2Pull
        def configure(self, ctx, state, clients):
            payloads = super().configure(ctx, state, clients)
            shared = dataclasses.replace(next(iter(payloads.values())), objectives=(L2Pull(0.5),))
            return {cid: shared for cid in payloads}

    class Halve(UpdateTransform):  # every uploaded tensor halved, its norm reported
        metric_keys = round_metrics = ("transform/norm",)

        def __call__(self, tensors, ctx):
            norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
            return {k: v / 2 for k, v in tensors.items()}, {"transform/norm": norm}

    class MeanLogp(Metric):  # the mean log-likelihood per scored token, from sums of its own
        keys = ("eval/mean_logp",)

        def sums(self, out):
            return {"logp_sum": float(out.logp.sum()), "logp_tokens": float(out.valid.sum())}

        def reduce(self, sums):
            return {"eval/mean_logp": sums["logp_sum"] / sums["logp_tokens"]}

    return NotebookFedIT, Halve, MeanLogp


@pytest.mark.usefixtures("shared_ray")
def test_a_notebooks_strategy_objective_transform_and_metric_run_on_ray(tiny_raw, tmp_path):
    strategy_cls, halve, mean_logp = _components()
    tiny_raw.update(strategy={"name": "notebook_fedit"})
    runs = {}
    for backend in ("local", "ray"):
        sc = scenario_from_dict(tiny_raw, [f"resources.backend={backend}"])
        base = resolve(sc)
        comp = dataclasses.replace(base, transforms=(halve(),), metrics=base.metrics + (mean_logp(),))
        run_scenario(sc, tmp_path / backend, components=comp)
        runs[backend] = _rows(tmp_path / backend)
    for a, b in zip(runs["local"], runs["ray"]):  # the Ray workers never saw the registration: same numbers
        for k in ("train/loss", "eval/loss", "eval/accuracy", "eval/mean_logp", "reg/l2_end", "transform/norm"):
            assert a.get(k) == b.get(k), (a["round"], k)
    last = runs["ray"][-1]
    assert last["reg/l2_end"] > 0 and last["transform/norm"] > 0
    assert last["eval/mean_logp"] == pytest.approx(-last["eval/loss"], rel=F32_NETWORK)
    plain = run_scenario(scenario_from_dict(tiny_raw, ["strategy.name=fedit"]), tmp_path / "fedit")
    assert plain["final/eval/loss"] != runs["local"][-1]["eval/loss"]  # the objective and the transform act


class _Counting(ServerStage):
    """Counts the updates it passed on (state that must survive a resume) and drops one client's."""

    metric_keys = ("stage/passed",)

    def __init__(self, drop: int):
        self.drop, self.passed = drop, 0

    def before(self, ctx, state, updates):
        kept = [u for u in updates if u.client_id != self.drop]
        return StageResult(kept, {self.drop: "dropped by the test stage"} if len(kept) < len(updates) else {})

    def after(self, ctx, old, new):
        self.passed += 1
        return new, {"stage/passed": float(self.passed)}

    def state_dict(self):
        return {"passed": self.passed}

    def load_state_dict(self, state):
        self.passed = state["passed"]


class _Recorder(RoundCallback):
    def __init__(self):
        self.events = []

    def on_round_start(self, server_round, num_clients):
        self.events.append(("start", server_round, num_clients))

    def on_round_end(self, server_round, row):
        self.events.append(("end", server_round, row.get("stage/passed")))

    def on_run_end(self, summary):
        self.events.append(("run_end", summary["rounds"]))


def test_a_server_stage_keeps_state_across_a_resume_and_callbacks_see_every_round(tiny_raw, tmp_path):
    tiny_raw.update(rounds=3)
    sc = scenario_from_dict(tiny_raw)
    rec = _Recorder()
    run_scenario(sc, tmp_path / "whole", callbacks=[rec],
                 components=dataclasses.replace(resolve(sc), stages=(_Counting(drop=-1),)))
    assert [e for e in rec.events if e[0] == "end"] == [("end", 0, None), ("end", 1, 1.0), ("end", 2, 2.0),
                                                         ("end", 3, 3.0)]
    assert rec.events[-1] == ("run_end", 3) and ("start", 1, 3) in rec.events
    meta = json.loads((tmp_path / "whole" / "checkpoint" / "meta.json").read_text())
    assert meta["strategy_state"]["__stages__"] == {"1": {"passed": 3}}
    # the same run stopped in round 3 (after round 2's checkpoint), then resumed with a fresh stage object
    with pytest.raises(RuntimeError, match="stopped by the test"):
        run_scenario(sc, tmp_path / "cut", callbacks=[StopAt(3, "stopped by the test")],
                     components=dataclasses.replace(resolve(sc), stages=(_Counting(drop=-1),)))
    resume_run(tmp_path / "cut", components=dataclasses.replace(resolve(sc), stages=(_Counting(drop=-1),)))
    whole, cut = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert [r["round"] for r in cut] == [0, 1, 2, 3]
    for k in ("stage/passed", "train/loss", "eval/loss", "eval/accuracy"):
        assert whole[-1][k] == cut[-1][k], k


def test_a_stage_that_rejects_a_client_counts_it_as_failed(tiny_raw, tmp_path):
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "plain")
    sampled = {r["round"]: r for r in _rows(tmp_path / "plain")}
    victim = int(next(iter(sampled[1]["comm/per_client"])))
    comp = dataclasses.replace(resolve(sc), stages=(_Counting(drop=victim),))
    run_scenario(sc, tmp_path / "drop", components=comp)
    row = _rows(tmp_path / "drop")[1]
    assert f"{victim}: dropped by the test stage" in row["clients/failures"]
    assert row["clients/succeeded"] == sampled[1]["clients/succeeded"] - 1


def test_an_undeclared_client_metric_fails_the_client_with_its_name(tiny_raw, tmp_path):
    class Loud(UpdateTransform):  # reports a metric it does not declare
        def __call__(self, tensors, ctx):
            return tensors, {"loud/thing": 1.0}

    tiny_raw.update(rounds=1, eval={"at_start": False, "every": 1})
    tiny_raw["resources"]["max_failed_rounds"] = 0
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "run", components=dataclasses.replace(resolve(sc), transforms=(Loud(),)))
    row = _rows(tmp_path / "run")[-1]
    assert row["clients/succeeded"] == 0
    assert all("loud/thing" in f and "not declared" in f for f in row["clients/failures"])


def test_a_row_format_of_ones_own(tiny_raw, tmp_path):
    from fedsim.data.datasets import load_data
    from fedsim.data.formats import Example, RowFormat, row_format

    @row_format("qa_test")
    class QA(RowFormat):
        default_template = "Q: {question}\nA: "

        def fields(self, cfg):
            return ["question", "answer"]

        def example(self, row, cfg):
            return Example(cfg.template().format(question=row["question"]), row["answer"])

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(40)))
    tiny_raw["data"] = {"source": str(path), "format": "qa_test", "task_field": None, "max_seq_len": 24}
    tiny_raw["partition"] = {"method": "iid"}
    data = load_data(scenario_from_dict(tiny_raw), use_cache=False)
    sample = data.train.sample(0)
    prompt = bytes(int(t) - 3 for t in sample[: data.train.prompt_len[0]] if t >= 3).decode()
    assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
    with pytest.raises(ScenarioError, match="unknown data format 'qa_missing'; choose from .*qa_test"):
        scenario_from_dict(tiny_raw, ["data.format=qa_missing"])


def test_the_registry_names_what_is_registered_and_refuses_a_second_owner():
    with pytest.raises(ScenarioError, match="unknown strategy 'nope'.*fedit"):
        registry.get("strategy", "nope")

    class A:
        pass

    class B:
        pass

    registry.register("metric", "test_owner", A)
    registry.register("metric", "test_owner", A)  # the same class again (a re-run cell) is fine
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("metric", "test_owner", B)
    assert "test_owner" in registry.names("metric")


@dataclasses.dataclass(frozen=True)
class _Visits(ClientObjective):
    """Keeps per-client state: how many rounds the client has trained (reported as ``visits/count``)."""

    metric_keys = round_metrics = ("visits/count",)
    state_key = "visits"

    def bind(self, params, lora, scaling, state=None):
        before = 0.0 if state is None else float(state["n"])

        class Bound(BoundObjective):
            def finish(self):
                return {"visits/count": before + 1}

            def state(self):
                return {"n": torch.tensor([before + 1])}

        return Bound()


@pytest.mark.parametrize("per_pass", [1, 3])
def test_an_objective_keeps_per_client_state_in_the_client_state_store(tiny_raw, tmp_path, per_pass):
    from safetensors.torch import load_file

    @register("visits_fedit")
    class VisitsFedIT(FedIT):
        keeps_client_state = True

        def configure(self, ctx, state, clients):
            payloads = super().configure(ctx, state, clients)
            shared = dataclasses.replace(next(iter(payloads.values())), objectives=(_Visits(),))
            return {cid: shared for cid in payloads}

    tiny_raw.update(rounds=4, strategy={"name": "visits_fedit"})
    tiny_raw["clients"].update(per_round=4)
    tiny_raw["resources"]["clients_per_pass"] = per_pass
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")[1:]
    times = {}
    for row in rows:
        for c in row["comm/per_client"]:
            times[int(c)] = times.get(int(c), 0) + 1
    store = tmp_path / "run" / "checkpoint" / "client_state"
    kept = {int(f.stem.split("_")[1]): float(load_file(str(f))["objective.visits.n"]) for f in store.iterdir()}
    assert kept == {c: float(n) for c, n in times.items()} and max(times.values()) > 1
    assert rows[-1]["visits/count"] >= 1.0

    @register("visits_undeclared")
    class Undeclared(VisitsFedIT):
        keeps_client_state = False

    tiny_raw.update(rounds=1, strategy={"name": "visits_undeclared"})
    with pytest.raises(Exception, match="keeps_client_state"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "undeclared")


def _notebook_procedure_and_format():
    """A procedure and a row format defined and registered here, at run time: the Ray workers' registries never
    hold them."""
    from fedsim import registry
    from fedsim.client.procedures import joint
    from fedsim.data.formats import Example
    from fedsim.data.formats.instruction import Instruction

    def twice_joint(job):  # the joint procedure, reporting that it ran
        metrics = joint(job)
        metrics["notebook/procedure"] = 1.0
        return metrics

    twice_joint.metric_keys = twice_joint.round_metrics = ("notebook/procedure",)
    registry.register("procedure", "notebook_joint", twice_joint)
    class Shouting(Instruction):  # the instruction format with the prompt in capitals
        name = "notebook_shouting"

        def example(self, row, cfg):
            plain = super().example(row, cfg)
            return Example(plain.prompt.upper(), plain.response)

    registry.register("row_format", "notebook_shouting", Shouting)

    @register("notebook_proc_fedit")
    class ProcFedIT(FedIT):  # FedIT whose clients train with the procedure named above
        def configure(self, ctx, state, clients):
            payloads = super().configure(ctx, state, clients)
            shared = dataclasses.replace(next(iter(payloads.values())), procedure="notebook_joint")
            return {cid: shared for cid in payloads}


@pytest.mark.usefixtures("shared_ray")
def test_a_procedure_and_a_row_format_defined_in_the_driver_run_on_ray(tiny_raw, tmp_path):
    """#46 point 3: the payload names a procedure registered only in this process; the workers take it from the
    components the driver resolved (never from their own registry); the row format shapes the prompts the driver
    tokenizes. Same numbers on both backends, and the procedure reports on every client."""
    _notebook_procedure_and_format()
    tiny_raw.update(strategy={"name": "notebook_proc_fedit"})
    tiny_raw["data"] = {**tiny_raw["data"], "format": "notebook_shouting"}
    runs = {}
    for backend in ("local", "ray"):
        run_scenario(scenario_from_dict(tiny_raw, [f"resources.backend={backend}"]), tmp_path / backend)
        runs[backend] = _rows(tmp_path / backend)
    for a, b in zip(runs["local"], runs["ray"]):
        for k in ("train/loss", "eval/loss", "notebook/procedure"):
            assert a.get(k) == b.get(k), (a["round"], k)
    assert runs["ray"][-1]["notebook/procedure"] == 1.0
    plain = run_scenario(scenario_from_dict(tiny_raw, ["data.format=instruction"]), tmp_path / "plain")
    assert plain["final/eval/loss"] != runs["local"][-1]["eval/loss"]  # the format changed what was trained
