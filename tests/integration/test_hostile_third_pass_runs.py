"""The third hostile pass (#45), the findings that need a run: what a run writes is strict JSON, and says which
values were not finite."""

from __future__ import annotations

import json
import sys

import pytest

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario


def _strict(text: str):
    """JSON as a strict parser reads it: NaN, Infinity and -Infinity are errors (Python's json writes them)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_a_nan_user_metric_is_null_in_strict_json_and_named(tiny_raw, tmp_path, monkeypatch):
    """A user metric that returns NaN: summary.json held NaN (a strict parser refused the file) and metrics.jsonl a
    bare null. Both are strict JSON now, with the key and what it was under not_finite."""
    (tmp_path / "nanmetric.py").write_text("def always_nan(prediction: str, reference: str) -> float:\n"
                                           "    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nanmetric", None)
    tiny_raw.update(rounds=1)
    tiny_raw["eval"].update(at_start=False, metrics=["nanmetric:always_nan"],
                            generate={"every": 1, "max_samples": 4, "max_new_tokens": 2})
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    summary = _strict((tmp_path / "run" / "summary.json").read_text())
    rows = [_strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/gen/always_nan"] is None
    assert rows[-1]["not_finite"]["eval/gen/always_nan"] == "nan"
    assert summary["final/eval/gen/always_nan"] is None
    assert summary["not_finite"]["final/eval/gen/always_nan"] == "nan"
    assert summary["final/eval/loss"] is not None  # the rest of the run is as it was
    assert [_strict(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]


def test_finite_json_names_every_kind_and_depth():
    from fedsim.federation.rundir import dumps

    text = dumps({"a": float("inf"), "b": {"c": [1.0, float("-inf")]}, "d": float("nan"), "e": 2})
    out = _strict(text)
    assert out == {"a": None, "b": {"c": [1.0, None]}, "d": None, "e": 2,
                   "not_finite": {"a": "inf", "b.c[1]": "-inf", "d": "nan"}}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nothing_non_finite_reaches_the_file(value):
    from fedsim.federation.rundir import dumps

    assert "NaN" not in dumps({"x": value}) and "Infinity" not in dumps({"x": value})


METRICS = '''
def one_arg(prediction):
    return 1.0

def a_string(prediction, reference):
    return "good"

def nothing(prediction, reference):
    return None

def raises(prediction, reference):
    raise KeyError(reference)

def on_digits(prediction, reference):
    if any(c.isdigit() for c in reference):
        raise ValueError("no digits, please")
    return float(prediction == reference)
'''


@pytest.mark.parametrize("name, says", [
    ("one_arg", r"usermetrics:one_arg takes \(prediction\), not \(prediction, reference\)"),
    ("a_string", r"usermetrics:a_string\('a', 'a'\) returned 'good', not a number"),
    ("nothing", r"usermetrics:nothing\('a', 'a'\) returned None, not a number"),
    ("raises", r"usermetrics:raises\('a', 'a'\) raised KeyError: 'a'"),
])
def test_a_broken_user_metric_is_refused_before_round_1(tiny_raw, tmp_path, monkeypatch, name, says):
    """#45: each of these ended the run in a traceback after all the training."""
    from fedsim.errors import ScenarioError

    (tmp_path / "usermetrics.py").write_text(METRICS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermetrics", None)
    tiny_raw["eval"]["metrics"] = [f"usermetrics:{name}"]
    with pytest.raises(ScenarioError, match=f"eval.metrics: {says}.*score\\(prediction: str, reference: str\\)"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before round 1


def test_a_user_metric_failing_on_some_samples_costs_those_scores_not_the_run(tiny_raw, tmp_path, monkeypatch,
                                                                              caplog):
    """It passes the first call and fails on the samples whose reference has a digit (the synthetic 'add' and
    'count' tasks): the run goes on to its end, the metric's value is NaN where it failed — null in metrics.jsonl,
    named under not_finite — and one warning names it."""
    (tmp_path / "usermetrics.py").write_text(METRICS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermetrics", None)
    tiny_raw.update(rounds=2)
    tiny_raw["eval"].update(at_start=False, metrics=["usermetrics:on_digits"],
                            generate={"every": 1, "max_samples": 8, "max_new_tokens": 2})
    with caplog.at_level("WARNING"):
        summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = [_strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and summary["final/eval/loss"] is not None
    assert all(r["eval/gen/on_digits"] is None and r["not_finite"]["eval/gen/on_digits"] == "nan" for r in rows)
    assert rows[-1]["eval/gen/task/upper/on_digits"] is not None  # no digits in 'upper': scored
    said = [m for m in caplog.messages if "usermetrics:on_digits failed on a sample" in m]
    assert len(said) == 1 and "ValueError: no digits, please" in said[0]


def test_a_link_planted_where_generations_are_written_is_never_followed(tiny_raw, tmp_path):
    """#45 point 10: a symlink planted as generations.tmp — on resume its target was overwritten and
    generations.jsonl stayed a link to it. Every file fedsim writes in a run directory, temporary ones too, is
    checked: the resume is refused, the target untouched; without the link it resumes and rewrites the file whole."""
    import os
    import shutil

    from fedsim.driver import resume_run
    from fedsim.errors import ScenarioError

    tiny_raw.update(rounds=3)
    tiny_raw["eval"].update(at_start=False, metrics=["exact_match"],
                            generate={"every": 1, "max_samples": 4, "max_new_tokens": 2})
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "done")
    out = tmp_path / "run"  # as if killed after round 2's checkpoint, round 3's generations already written
    shutil.copytree(tmp_path / "done", out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoint")
    os.replace(out / ".checkpoint.prev", out / "checkpoint")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("generations.tmp", "generations.jsonl"):
        kept = (out / name).read_bytes() if (out / name).is_file() else None
        if kept is not None:
            (out / name).unlink()
        (out / name).symlink_to(victim)
        with pytest.raises(ScenarioError, match=f"{name} is a symbolic link"):
            resume_run(out)
        assert victim.read_text() == "precious"
        (out / name).unlink()
        if kept is not None:
            (out / name).write_bytes(kept)
    resume_run(out)
    rounds = [_strict(x)["round"] for x in (out / "generations.jsonl").read_text().splitlines()]
    assert rounds == sorted(rounds) and set(rounds) == {1, 2, 3} and not (out / "generations.jsonl").is_symlink()
    assert rounds.count(3) == rounds.count(1)  # round 3 generated again, its old lines dropped, not doubled


def test_a_full_disk_during_a_merged_export_is_one_line_and_leaves_nothing(tiny_raw, tmp_path, small_fs, capsys):
    """#45 point 11: `fedsim export --merged` on a full disk was a SafetensorError traceback and a half-written export
    directory. On a 16 MB tmpfs filled to the last byte (or, where nothing can be mounted, with safetensors raising
    its own full-disk error): one line, exit 2, no export directory and no temporary one; with space, it works."""
    from conftest import fill_disk

    from fedsim.cli import main

    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    where = (small_fs or tmp_path) / "exports"
    where.mkdir()
    out = where / "merged"
    if small_fs is not None:
        fill_disk(where)
        rc = main(["export", str(tmp_path / "run"), "--merged", "--out", str(out)])
    else:
        import safetensors.torch
        from safetensors import SafetensorError

        full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                               'space left on device" })')
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(full))
            rc = main(["export", str(tmp_path / "run"), "--merged", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: cannot write the export to {out}: ") and "No space left" in err
    assert len(err.strip().splitlines()) == 1 and "nothing was left there" in err
    assert sorted(p.name for p in where.iterdir()) == (["filler"] if small_fs is not None else [])
    (where / "filler").unlink(missing_ok=True)
    assert main(["export", str(tmp_path / "run"), "--merged", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "fedsim_export.json").is_file()


def test_a_resume_whose_rows_are_gone_says_what_its_totals_leave_out(tiny_raw, tmp_path):
    """#45 point 12: `--resume` after metrics.jsonl was removed gave totals of a third of the truth and a wrong best
    accuracy without a word. The run now says which rounds' rows are gone (summary.json's notes, the console)."""
    import os
    import shutil

    from fedsim.driver import resume_run

    tiny_raw.update(rounds=3)
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "done")
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "done", out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoint")
    os.replace(out / ".checkpoint.prev", out / "checkpoint")  # killed after round 2's checkpoint
    (out / "metrics.jsonl").unlink()
    summary = resume_run(out)
    said = [n for n in summary["notes"] if n.startswith("resume: metrics.jsonl has no rows")]
    assert said == ["resume: metrics.jsonl has no rows for round(s) 1-2, which the checkpoint says were done: the "
                    "communication totals and the best accuracy of summary.json leave those rounds out"]
    assert [_strict(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3]


def test_describe_missing_joins_spans():
    from fedsim.federation.rundir import describe_missing, missing_rounds

    assert missing_rounds([{"round": 0}, {"round": 2}, {"round": 5}], 6) == [1, 3, 4, 6]
    assert "round(s) 1, 3-4, 6," in describe_missing([1, 3, 4, 6])


def test_resuming_a_finished_run_rewrites_nothing(tiny_raw, tmp_path, caplog):
    """#45 point 12: resuming a finished run rewrote summary.json (its time and worker counters reset)."""
    tiny_raw.update(rounds=2)
    from fedsim.driver import resume_run

    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()}
    text = (tmp_path / "run" / "summary.json").read_text()
    with caplog.at_level("WARNING"):
        again = resume_run(tmp_path / "run")
    assert again["time_s"] == summary["time_s"] and (tmp_path / "run" / "summary.json").read_text() == text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert any("finished already (summary.json); nothing to resume, nothing rewritten" in m for m in caplog.messages)


def test_exporting_a_damaged_checkpoint_advises_an_export(tiny_raw, tmp_path, capsys):
    """#45 point 12: exporting a run whose newest checkpoint is damaged advised `fedsim run --resume ...
    --previous-checkpoint`; it now advises the export itself, which takes --previous-checkpoint too."""
    from fedsim.cli import main

    tiny_raw.update(rounds=2)
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    with open(tmp_path / "run" / "checkpoint" / "state.safetensors", "r+b") as f:
        f.truncate(100)
    assert main(["export", str(tmp_path / "run"), "--client", "1"]) == 2
    err = capsys.readouterr().err
    assert "previous checkpoint (round 1) is intact" in err and "fedsim run" not in err
    assert err.strip().endswith(f"(fix: use it: fedsim export {tmp_path / 'run'} --client 1 --previous-checkpoint)")
    assert main(["export", str(tmp_path / "run"), "--client", "1", "--previous-checkpoint"]) == 0
    info = json.loads((tmp_path / "run" / "export" / "client-1" / "fedsim_export.json").read_text())
    assert info["round"] == 1


def test_a_failed_wandb_start_leaves_an_out_that_can_be_used_again(tiny_raw, tmp_path, monkeypatch):
    """#45 point 12: W&B failing to start (here: a WANDB_SERVICE that names no service, as a stale shell leaves it)
    left a 0-byte metrics.jsonl that blocked the same --out ('already holds a run'). A directory whose run stopped
    before its first round can be used again; one with rows or a checkpoint cannot."""
    from fedsim.errors import FedsimError, ScenarioError

    tiny_raw["logging"]["wandb"] = {"mode": "offline"}
    monkeypatch.setenv("WANDB_SERVICE", "2-99999-tcp-localhost-1")
    with pytest.raises(FedsimError, match="Weights & Biases could not start"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size == 0
    monkeypatch.delenv("WANDB_SERVICE")
    tiny_raw["logging"]["wandb"] = {"mode": "disabled"}
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert summary["final/eval/loss"] is not None
    with pytest.raises(ScenarioError, match="already holds a run"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
