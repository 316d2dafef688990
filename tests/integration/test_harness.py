"""lm-evaluation-harness on the in-memory model (#24 point 6): a local task (a YAML over a local JSON-lines file, no
download) run on the global model and a client's own model during a run, and the same numbers from lm-eval run
directly on what `fedsim export` writes."""

import json

import pytest
import torch
from tolerances import F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import ScenarioError

pytest.importorskip("lm_eval")


def toy_task(folder):
    """A multiple-choice task of lm-eval's own YAML format over a local JSON-lines file."""
    folder.mkdir()
    rows = [{"question": f"add {i} {j}", "choices": [str(i + j), str(i + j + 1), str(i * j + 7)], "gold": k % 3}
            for k, (i, j) in enumerate((i, j) for i in range(8) for j in range(6))]
    for r in rows:  # the right answer moves between positions
        r["choices"].insert(r["gold"], r["choices"].pop(0))
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(
        "task: toy_add\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'toy.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\n"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "ppl.yaml").write_text(  # a continuous score: equal numbers mean the same model
        "task: toy_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'toy.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{question}}\\n"\ndoc_to_target: "{{choices[gold]}}"\n'
        "metric_list:\n  - metric: perplexity\n")
    return folder


def test_harness_in_a_run_equals_lm_eval_on_the_exported_adapter(tiny_raw, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel

    from fedsim.eval.harness import flatten
    from fedsim.export import export_client
    from fedsim.models.base import build_base_model, load_tokenizer

    tasks = toy_task(tmp_path / "tasks")
    tiny_raw.update(rounds=1, strategy={"name": "fedsa"})  # personal A matrices: client 1's own model differs
    tiny_raw["clients"]["per_round"] = 8  # client 1 among them
    tiny_raw["eval"].update(at_start=False, local_test_fraction=0.2, local_clients=2,
                            harness={"tasks": ["toy_add", "toy_ppl"], "include_path": str(tasks),
                                                     "clients": [1], "batch_size": 4})
    sc = scenario_from_dict(tiny_raw)
    summary = run_scenario(sc, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"harness/toy_add/acc", "harness/toy_add/acc_norm", "harness/client_1/toy_add/acc",
            "harness/toy_ppl/perplexity"} <= set(row)
    assert row["harness/toy_ppl/perplexity"] != row["harness/client_1/toy_ppl/perplexity"]  # its own A matrices
    assert summary["final/harness/toy_add/acc"] == row["harness/toy_add/acc"]

    def lm_eval_on(adapter_dir):
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(build_base_model(sc.model), str(adapter_dir)).eval()
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=load_tokenizer(sc.model), batch_size=4),
                              tasks=["toy_add", "toy_ppl"],
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                              log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        return flatten(out["results"])

    direct = lm_eval_on(tmp_path / "run" / "adapter")
    assert direct == pytest.approx({k.removeprefix("harness/"): v for k, v in row.items()
                                    if k.startswith(("harness/toy_add/", "harness/toy_ppl/"))}, rel=F32_NETWORK)
    export_client(tmp_path / "run", 1, tmp_path / "client1")
    # client 1's adapter folds its personal A into one PEFT adapter: the same model, float32 rounding apart
    assert lm_eval_on(tmp_path / "client1") == pytest.approx(
        {k.removeprefix("harness/client_1/"): v for k, v in row.items() if k.startswith("harness/client_1/")},
        rel=F32_NETWORK)


def test_an_unknown_harness_task_is_named_before_round_1(tiny_raw, tmp_path):
    tasks = toy_task(tmp_path / "tasks")
    tiny_raw["eval"]["harness"] = {"tasks": ["toy_ad"], "include_path": str(tasks)}
    with pytest.raises(ScenarioError, match=r"lm-eval has no task\(s\) \['toy_ad'\] \(close: .*toy_add"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        not (tmp_path / "run" / "metrics.jsonl").read_text().strip()


def test_harness_configuration_errors_are_one_line(tiny_raw, tmp_path):
    tiny_raw["eval"]["harness"] = {"tasks": ["toy"], "include_path": str(tmp_path / "nowhere")}
    with pytest.raises(ScenarioError, match="include_path .* is not a directory"):
        scenario_from_dict(tiny_raw)
    tiny_raw["eval"]["harness"] = {"tasks": ["toy"], "clients": [99]}
    with pytest.raises(ScenarioError, match=r"no client\(s\) \[99\]: the run has clients 0\.\.7"):
        scenario_from_dict(tiny_raw)
    tiny_raw["eval"]["harness"] = {"tasks": ["toy"], "limit": 2.5}
    with pytest.raises(ScenarioError, match="neither a count .* nor a fraction"):
        scenario_from_dict(tiny_raw)
    tiny_raw["eval"]["harness"] = {"tasks": []}
    with pytest.raises(ScenarioError, match="tasks"):
        scenario_from_dict(tiny_raw)


def test_flatten_keeps_numbers_and_names_filters():
    from fedsim.eval.harness import flatten

    got = flatten({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1,
                         "sample_len": 3, "bad,none": float("nan")}})
    assert got == {"t/acc": 0.5, "t/exact_match_strict-match": 1.0}
