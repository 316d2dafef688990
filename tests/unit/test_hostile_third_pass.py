"""The third hostile pass (#45), each finding as it really happened: YAML's ``.inf``/``.nan`` and booleans in numeric
keys, and what the accountant reports."""

from __future__ import annotations

import copy
import json
import math

import pytest
import yaml
from conftest import TINY

import fedsim.config  # noqa: F401 — every section registered as a Strict subclass
import fedsim.strategies  # noqa: F401 — and every strategy's params
from fedsim.cli import main
from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.schema import Strict, bool_for_number


def _models() -> list[type[Strict]]:
    out, todo = [], list(Strict.__subclasses__())
    while todo:
        m = todo.pop()
        out.append(m)
        todo += m.__subclasses__()
    return out


def _numeric_fields() -> list[tuple[type, str, object]]:
    return [(m, name, f.annotation) for m in _models() for name, f in m.model_fields.items()
            if bool_for_number(True, f.annotation)]


def test_the_schema_has_numeric_fields_to_check():
    fields = _numeric_fields()
    assert len({m for m, _, _ in fields}) >= 20 and len(fields) >= 80, len(fields)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, True])
def test_no_numeric_key_takes_infinity_nan_or_a_boolean(bad):
    """Every int or float key of every section and strategy's params (found from the schema, so a new one is
    covered): the value is an error on that key — pydantic's own bounds let infinity through, and read true as 1."""
    missed = []
    for model, name, annotation in _numeric_fields():
        if bad is not True and not any(a is float for a in (annotation, *getattr(annotation, "__args__", ()))):
            continue  # an int key: pydantic refuses a float infinity there anyway
        try:
            model.model_validate({name: bad})
        except Exception as e:  # noqa: BLE001 — pydantic's ValidationError, or a model validator's own
            if any(err["loc"][:1] == (name,) for err in getattr(e, "errors", lambda: [])()):
                continue
        missed.append(f"{model.__name__}.{name}")
    assert not missed, missed


@pytest.mark.parametrize("overrides, key", [
    (["privacy.clipping_norm=.inf", "privacy.noise_multiplier=1.0"], "privacy.clipping_norm"),
    (["privacy.clipping_norm=1.0", "privacy.noise_multiplier=.inf"], "privacy.noise_multiplier"),
    (["privacy.clipping_norm=1.0", "privacy.target_epsilon=.inf"], "privacy.target_epsilon"),
    (["clock.by_bits={32: .nan}"], "clock.by_bits.32"),
    (["rounds=true"], "rounds"),
    (["clients.lora.rank=false"], "clients.lora.rank"),
    (["strategy.name=pf2lora", "eval.local_test_fraction=0.2", "strategy.params.inner_lr=.inf"], "inner_lr"),
    (["strategy.client_objective.name=fedprox", "strategy.client_objective.params.mu=.nan"], "mu"),
])
def test_the_issues_cases_are_one_line_naming_the_key(overrides, key):
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")) as e:
        scenario_from_dict(copy.deepcopy(TINY), overrides)
    assert len(str(e.value).splitlines()) == 1


def test_validate_refuses_an_infinite_noise_multiplier_at_once(tmp_path, capsys):
    """`fedsim validate` printed ok and the run then hung in the accountant."""
    raw = copy.deepcopy(TINY)
    raw["privacy"] = {"clipping_norm": 1.0, "noise_multiplier": math.inf}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert ".inf" in (tmp_path / "s.yaml").read_text()
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: privacy.noise_multiplier") and "finite" in err


def test_epsilon_is_never_negative_where_opacus_converts_below_zero():
    """At δ = 1/20^1.1 = 0.037 (the default for 20 clients) and much noise the RDP conversion goes below 0 (the
    issue's ε logged below zero every round): the mechanism is then (0, δ)-DP, and ε is 0, never less."""
    import warnings

    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedsim.pipeline.privacy import RDP_ORDERS, PrivacyAccountant, epsilon

    delta, q = 1 / 20**1.1, 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = get_privacy_spent(orders=RDP_ORDERS, rdp=compute_rdp(q=q, noise_multiplier=50.0, steps=10,
                                                                   orders=RDP_ORDERS), delta=delta)[0]
    assert raw < 0  # what was logged
    assert epsilon(50.0, q, 10, delta) == 0.0
    acc = PrivacyAccountant("central", 50.0, q, delta, "rdp")
    assert [acc.epsilon(k) for k in (1, 5, 10)] == [0.0, 0.0, 0.0]
    assert all(epsilon(s, q, 10, delta) >= 0 for s in (0.5, 1, 2, 5, 10, 20, 100))


def _validate(raw, tmp_path, capsys) -> str:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0
    return capsys.readouterr().out


def test_the_default_delta_is_well_below_one_over_n_and_a_larger_one_is_warned_of(tmp_path, capsys):
    """DP asks δ ≪ 1/N; the old default 1/N^1.1 was 0.037 for 20 clients (1/N = 0.05). The default is now
    min(10⁻⁵, 0.1/N) and says nothing; a δ above 0.1/N is warned of by validate and the run, with the fix; δ ≥ 1/N
    is refused."""
    from fedsim.config.privacy import PrivacyConfig

    raw = copy.deepcopy(TINY)
    raw["clients"]["num_clients"] = 20
    raw["privacy"] = {"clipping_norm": 1.0, "noise_multiplier": 1.0}
    out = _validate(raw, tmp_path, capsys)
    assert "at δ = 1e-05 after 2 rounds" in out and "warning: privacy" not in out
    assert PrivacyConfig(clipping_norm=1.0, noise_multiplier=1.0).delta_for(100_000) == 1e-6
    raw["privacy"]["delta"] = 0.02
    out = _validate(raw, tmp_path, capsys)
    assert ("warning: privacy: δ = 0.02 is not well below 1/N = 0.05 (N = 20 clients): publishing each client's "
            "data whole with probability δ would meet it; set privacy.delta to at most 0.1/N, e.g. 1e-05") in out
    raw["privacy"]["delta"] = 0.05
    with pytest.raises(ScenarioError, match="privacy.delta: δ = 0.05 is not below 1/N"):
        scenario_from_dict(raw)


def test_a_target_epsilon_that_cannot_be_reached_is_one_line():
    """ε = 10⁻⁹ was 'solved' (σ = 6.08, the conversion's negative ε counted as reaching it); at the default δ it is out
    of reach of any noise multiplier up to 10⁴, and says so."""
    raw = copy.deepcopy(TINY)
    raw["privacy"] = {"clipping_norm": 1.0, "target_epsilon": 1e-9}
    from fedsim.components import privacy_line
    from fedsim.strategies import make_strategy

    sc = scenario_from_dict(raw)
    with pytest.raises(ScenarioError, match=r"privacy.target_epsilon: ε = 1e-09 at δ = 1e-05 cannot be reached") as e:
        privacy_line(sc, make_strategy("fedit"))
    assert len(str(e.value).splitlines()) == 1


def test_more_shards_than_samples_is_one_line():
    """200,000 shards for 2,000 rows was accepted (most shards empty, clients with a label or none)."""
    from fedsim.data.partition import partition

    raw = copy.deepcopy(TINY)
    raw["partition"] = {"method": "shards", "by": "task", "shards_per_client": 100}
    sc = scenario_from_dict(raw)  # 8 clients × 100 shards for 240 rows
    import numpy as np

    with pytest.raises(ScenarioError, match=r"partition.shards_per_client: 8 clients × 100 shards = 800 shards for "
                                            r"240 samples.*at most 30"):
        partition(sc.partition, np.arange(240) % 3, 240, 8, 0)


@pytest.mark.parametrize("where, says", [("/dev/zero", "is not a regular file"), ("dir", "is a directory"),
                                         ("none.yaml", "does not exist")])
def test_a_scenario_path_that_is_no_file_says_what_it_is(tmp_path, capsys, where, says):
    """`fedsim validate /dev/zero` and `fedsim validate <a directory>` said the file 'does not exist'."""
    path = where if where.startswith("/") else str(tmp_path / where)
    (tmp_path / "dir").mkdir()
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: scenario file {path!r} {says}") and len(err.strip().splitlines()) == 1


def test_the_too_long_warning_under_auto_does_not_advise_auto():
    """With max_seq_len: auto (the 99th percentile of the training rows) the test rows' too-long warning advised
    'set it to auto'. It now says what auto chose and the length that keeps the rows whole."""
    from fedsim.data.report import warnings as data_warnings

    split = {"rows": 100, "truncated": 0, "response_cut": 3, "dropped": 0, "longest": 61}
    said = data_warnings({"max_seq_len": 40, "auto": True, "model_max": 512, "test": split})
    assert len(said) == 1 and "set it to auto" not in said[0]
    assert said[0].endswith("max_seq_len: auto chose 40 (the length most training rows fit in); set "
                            "data.max_seq_len: 64 to keep every row whole")
    said = data_warnings({"max_seq_len": 40, "auto": True, "model_max": 48, "test": split})
    assert said[0].endswith("set data.max_seq_len: 48 to keep them whole up to the model maximum 48")
    said = data_warnings({"max_seq_len": 40, "auto": False, "model_max": 512, "test": split})
    assert said[0].endswith("raise data.max_seq_len or set it to auto")


def test_a_field_given_twice_in_a_json_line_is_one_line(tmp_path):
    """It printed a datasets log line and 'Trailing data'."""
    from fedsim.data.sources import load_rows
    from fedsim.errors import DataError

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    lines = [json.dumps(r) for r in rows]
    lines[3] = '{"instruction": "q3", "output": "a3", "output": "b3"}'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    raw = copy.deepcopy(TINY)
    raw["data"] = {"source": str(tmp_path / "d.jsonl")}
    with pytest.raises(DataError, match=r"d.jsonl line 4 gives the field 'output' twice; give each field once"):
        load_rows(scenario_from_dict(raw).data)


def test_a_sweep_of_more_than_ten_thousand_runs_is_refused_at_once(tmp_path):
    """`fedsim sweep --seeds 100000` planned for minutes and past 2 GB without a word: refused before a point is
    planned."""
    from fedsim.sweep import plan

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(copy.deepcopy(TINY)))
    with pytest.raises(ScenarioError, match=r"--grid: the sweep has 200,000 runs \(2 × 100000 values with the seeds\); "
                                            r"fedsim sweeps at most 10,000"):
        plan(tmp_path / "s.yaml", ["clients.lora.rank=2,4"], seeds=100_000)


def test_a_job_whose_python_cannot_run_fedsim_says_so_in_one_line(tmp_path):
    """`fedsim submit` ran the cluster's system python and ended in a raw "No module named 'ray'" traceback. The
    job's entrypoint checks its Python first; run here with an interpreter that sees no site-packages (-S, as a
    system python without fedsim's dependencies): one line naming the interpreter and --python."""
    import shlex
    import subprocess
    import sys

    from fedsim.runtime.ray.submit import default_python, entrypoint

    assert default_python("http://127.0.0.1:8265") == sys.executable and default_python("http://head:8265") == "python"
    command = entrypoint(sys.executable, ["-c", "print('fedsim ran')"])
    ok = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=str(tmp_path.parent))
    assert ok.returncode == 0 and ok.stdout.strip() == "fedsim ran", ok.stderr
    bare = entrypoint(f"{sys.executable} -S", ["-c", "print('fedsim ran')"]).replace(
        shlex.quote(f"{sys.executable} -S"), f"{shlex.quote(sys.executable)} -S")
    r = subprocess.run(["bash", "-c", bare], capture_output=True, text=True)
    assert r.returncode == 1 and "fedsim ran" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: the job's Python") and "has no ray, torch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--python" in r.stderr


@pytest.mark.parametrize("overrides, says", [
    (["training.local_step=3"], "training.local_step: unknown key; did you mean local_steps? training takes "
                                "local_steps, local_epochs, batch_size, lr,"),
    (["bogus=1"], "bogus: unknown key; a scenario takes name, seed, rounds, model, data,"),
    (["strategy.name=pf2lora", "eval.local_test_fraction=0.2", "strategy.params.personal_rnk=2"],
     "strategy.params.personal_rnk: unknown key; did you mean personal_rank? strategy.params takes personal_rank,"),
    (["strategy.name=fedavg"], "unknown strategy 'fedavg': FedAvg of the LoRA factors is fedit"),
    (["strategy.name=flor"], "unknown strategy 'flor' (fix: did you mean flora? use one of"),
])
def test_an_unknown_key_or_name_lists_what_there_is_and_the_closest(overrides, says):
    """Unknown keys pointed at a help page with no keys; `fedavg` did not say that FedIT is FedAvg on LoRA."""
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(copy.deepcopy(TINY), overrides)
    assert says in str(e.value) and len(str(e.value).splitlines()) == 1


def test_the_console_headline_is_the_metric_the_scenario_is_about():
    """#45 point 17: personalized runs showed `0.000 → 0.000` while personal accuracy was 0.113; the chat scenario
    accuracy 0 beside exact match 0.105; F1/MCC, generation and harness scores never appeared."""
    from fedsim.progress import headline, shown_metrics

    personal = {"initial/eval/accuracy": 0.0, "final/eval/accuracy": 0.0, "final/eval/personal/accuracy": 0.113}
    assert headline(personal) == "  eval personal accuracy 0.113  accuracy 0.000"
    chat = {"initial/eval/accuracy": 0.0, "final/eval/accuracy": 0.0, "initial/eval/gen/exact_match": 0.02,
            "final/eval/gen/exact_match": 0.105, "final/eval/gen/rouge_l": 0.31,
            "final/eval/gen/task/chat/exact_match": 0.1}
    assert headline(chat) == "  eval exact_match 0.020 → 0.105  accuracy 0.000  rouge_l 0.310"
    cls = {"initial/eval/accuracy": 0.5, "final/eval/accuracy": 0.8, "final/eval/macro_f1": 0.79,
           "final/eval/mcc": 0.6, "final/harness/arc_easy/acc": 0.41, "final/harness/client_3/arc_easy/acc": 0.4}
    assert headline(cls) == "  eval accuracy 0.500 → 0.800  macro_f1 0.790  mcc 0.600  arc_easy/acc 0.410"
    row = {"eval/accuracy": 0.0, "eval/personal/accuracy": 0.2, "eval/gen/bleu": 12.5, "eval/gen/task/a/bleu": 3.0}
    assert shown_metrics(row) == [("eval/personal/accuracy", "personal_acc"), ("eval/gen/bleu", "bleu")]
