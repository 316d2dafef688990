"""Experiments you can compare (#28 points 4–6): W&B names that say what was overridden, one group per sweep
invocation, sweeps over seeds aggregated as mean ± std, sweeps that resume, curves.png per run and ``fedsim plot``."""

import csv
import json
import statistics

import pytest
import yaml
from stopping import StopAt

from fedsim.cli import main
from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import ScenarioError
from fedsim.sweep import plan, run_sweep
from fedsim.tracking import run_name


@pytest.fixture
def tiny_yaml(tmp_path, tiny_raw):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def test_wandb_run_names_say_what_the_overrides_changed(tiny_raw):
    plain = scenario_from_dict(tiny_raw)
    assert run_name(plain) == "tiny"
    changed = scenario_from_dict(tiny_raw, ["rounds=3", "clients.lora.rank=2", "logging.console=false"])
    assert run_name(changed) == "tiny-rounds=3_rank=2"
    assert run_name(scenario_from_dict(tiny_raw, ["name=other", "rounds=3"])) == "other-rounds=3"
    tiny_raw["logging"]["wandb"]["name"] = "{strategy}-s{seed}-{name}"
    assert run_name(scenario_from_dict(tiny_raw, ["rounds=3"])) == "fedit-s3-tiny"
    tiny_raw["logging"]["wandb"]["name"] = "{model}"
    with pytest.raises(ScenarioError, match=r"logging.wandb.name: .*\{name\}, \{seed\}, \{strategy\}, \{rounds\}"):
        scenario_from_dict(tiny_raw)


def test_a_run_draws_its_curves_and_fedsim_plot_overlays_runs_or_refuses(tiny_raw, tmp_path, capsys):
    tiny_raw["logging"]["plots"] = True
    tiny_raw.update(rounds=2)
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "a")
    assert (tmp_path / "a" / "curves.png").stat().st_size > 20_000
    run_scenario(scenario_from_dict(tiny_raw, ["strategy.name=ffa", "logging.plots=false"]), tmp_path / "b")
    assert not (tmp_path / "b" / "curves.png").exists()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 20_000
    assert main(["plot", str(tmp_path)]) == 2
    assert "is neither a run directory (no metrics.jsonl) nor a sweep directory" in capsys.readouterr().err
    # #45: --out DIR wrote DIR.png and said "wrote DIR"; --out x.txt was a traceback
    (tmp_path / "figs").mkdir()
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "figs")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'figs' / 'curves.png'}"
    assert (tmp_path / "figs" / "curves.png").stat().st_size > 20_000 and not (tmp_path / "figs.png").exists()
    assert main(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "x.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {tmp_path / 'x.txt'} does not end in .png (fix: give a " \
                                              ".png file or a folder)"


def test_a_sweep_over_seeds_aggregates_resumes_and_keeps_its_group(tiny_yaml, tmp_path):
    out = tmp_path / "sweep"
    sets = ["rounds=2", "eval.at_start=false"]
    rows = run_sweep(tiny_yaml, ["clients.lora.rank=2,4"], sets, out, seeds=2)
    assert [(r["clients.lora.rank"], r["seed"]) for r in rows] == [("2", "3"), ("2", "4"), ("4", "3"), ("4", "4")]
    table = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(t["clients.lora.rank"], t["seeds"]) for t in table] == [("2", "2"), ("4", "2")]
    for t in table:
        mine = [float(r["final_loss"]) for r in rows if r["clients.lora.rank"] == t["clients.lora.rank"]]
        assert float(t["final_loss"]) == pytest.approx(statistics.mean(mine))
        assert float(t["final_loss_std"]) == pytest.approx(statistics.stdev(mine))
    assert len(list(csv.DictReader(open(out / "sweep_runs.csv")))) == 4
    assert (out / "sweep.png").stat().st_size > 20_000
    group = json.loads((out / "sweep.json").read_text())["group"]
    assert group.startswith("sweep-")  # the directory's name and the time: one group per invocation
    names = set()
    for r in rows:
        saved = yaml.safe_load(open(f"{r['run_dir']}/scenario.yaml"))
        assert saved["logging"]["wandb"]["group"] == group and "sweep" in saved["logging"]["wandb"]["tags"]
        names.add(run_name(scenario_from_dict(saved)))
    assert len(names) == 4

    # interrupt: one point lost entirely, one stopped after its first round's checkpoint
    first, second = rows[0]["run_dir"], rows[1]["run_dir"]
    import shutil

    shutil.rmtree(first)
    shutil.rmtree(second)
    _, points = plan(tiny_yaml, ["clients.lora.rank=2,4"], sets, seeds=2, group=group)
    with pytest.raises(RuntimeError, match="stopped"):
        run_scenario(points[1]["scenario"], second, callbacks=[StopAt(2)])
    untouched = {r["run_dir"]: (tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in rows[2:]}
    with pytest.raises(ScenarioError, match="holds a sweep already.*--resume"):
        run_sweep(tiny_yaml, ["clients.lora.rank=2,4"], sets, out, seeds=2)
    with pytest.raises(ScenarioError, match="holds another sweep: its seeds differ"):
        run_sweep(tiny_yaml, ["clients.lora.rank=2,4"], sets, out, seeds=3, resume=True)
    again = run_sweep(tiny_yaml, ["clients.lora.rank=2,4"], sets, out, seeds=2, resume=True)
    for a, b in zip(rows, again):
        assert a["final_loss"] == b["final_loss"], a["run_dir"]  # resumed and rerun points give the same numbers
    for d, mtime in untouched.items():
        assert (tmp_path / d / "summary.json").stat().st_mtime_ns == mtime  # finished points were not rerun
    assert main(["plot", str(out), "--out", str(tmp_path / "s.png")]) == 0 and (tmp_path / "s.png").is_file()
