"""Differential privacy and data poisoning from a scenario file (#27 points 1–2, 5): ε per round and in the summary as
the accountant computes it, adaptive clipping resumed exactly, local DP on Ray with packed clients equal to the local
backend, the fresh adapter as a FLoRA client's start, label flipping."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import news_data
from stopping import StopAt
from tolerances import F32_ELEMENTWISE, F32_NETWORK, F64

from fedsim.components import resolve
from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario
from fedsim.pipeline.privacy import epsilon
from fedsim.pipeline.transforms import UpdateTransform

PRIVACY = {"clipping_norm": 0.5, "noise_multiplier": 0.8, "delta": 0.01}


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_central_dp_reports_epsilon_each_round_and_resumes_adaptive_clipping_exactly(tiny_raw, tmp_path):
    tiny_raw.update(rounds=3, privacy={**PRIVACY, "adaptive": {"count_noise": 1.0, "lr": 0.5}})
    sc = scenario_from_dict(tiny_raw)
    summary = run_scenario(sc, tmp_path / "whole")
    rows = _rows(tmp_path / "whole")
    for r in rows[1:]:  # q = 3 of 8 clients per round
        assert r["privacy/epsilon"] == pytest.approx(epsilon(0.8, 3 / 8, r["round"], 0.01), rel=F64)
    assert len({r["privacy/clipping_norm"] for r in rows[1:]}) == 3  # C moves every round
    assert summary["privacy"] == {"mode": "central", "epsilon": rows[-1]["privacy/epsilon"], "delta": 0.01,
                                  "noise_multiplier": 0.8, "accountant": "rdp", "sample_rate": 0.375,
                                  "clipping_norm": rows[-1]["privacy/clipping_norm"], "adaptive": True}
    with pytest.raises(RuntimeError, match="stopped"):
        run_scenario(sc, tmp_path / "cut", callbacks=[StopAt(3)])
    resume_run(tmp_path / "cut")  # C from the server's checkpoint, the noise from (seed, round)
    for k in ("eval/loss", "privacy/clipping_norm", "privacy/epsilon", "privacy/clipped"):
        assert _rows(tmp_path / "cut")[-1][k] == rows[-1][k], k


def test_a_target_epsilon_is_met_after_the_last_round_with_poisson_sampling(tiny_raw, tmp_path, capsys):
    """σ solved before round 1 (and said by ``fedsim validate``); Poisson sampling: each client with probability
    per_round / N, so the number per round varies and q is exact."""
    import yaml

    from fedsim.cli import main

    tiny_raw.update(rounds=3, privacy={"clipping_norm": 0.5, "target_epsilon": 4.0, "delta": 0.01})
    tiny_raw["clients"].update(sampling="poisson")
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert 3.9 < summary["privacy"]["epsilon"] <= 4.0 and summary["privacy"]["sample_rate"] == 3 / 8
    sigma = summary["privacy"]["noise_multiplier"]
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilon(sigma, 3 / 8, 3, 0.01), rel=F64)
    assert len({r["clients/sampled"] for r in _rows(tmp_path / "run")[1:]}) > 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0
    assert (f"privacy: central DP, C = 0.5, σ = {sigma:.4g} (solved for ε = 4); ε = "
            f"{summary['privacy']['epsilon']:.3g} at δ = 0.01 after 3 rounds (q = 0.375, RDP)") in capsys.readouterr().out


@pytest.mark.usefixtures("shared_ray")
def test_local_dp_on_ray_with_packed_clients_equals_the_local_backend(tiny_raw, tmp_path):
    tiny_raw.update(rounds=2, strategy={"name": "flora"}, privacy={**PRIVACY, "mode": "local"})
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    ray = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.clients_per_pass=3"]),
                       tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for ra, rb in zip(a, b):
        for k in ("eval/loss", "train/loss", "privacy/epsilon", "privacy/clipped"):
            assert (k in ra) == (k in rb) == (k == "eval/loss" or ra["round"] > 0), (ra["round"], k)
            assert ra.get(k) == pytest.approx(rb.get(k), rel=F32_NETWORK) if k in ra else True, (ra["round"], k)
    assert b[-1]["train/clients_per_pass"] > 1  # packed on Ray
    # local mode: the Gaussian mechanism at σ/2 over the most updates one client sent
    sent = {}
    for r in a[1:]:
        for c in r["comm/per_client"]:
            sent[c] = sent.get(c, 0) + 1
        assert r["privacy/epsilon"] == pytest.approx(epsilon(0.4, 1.0, max(sent.values()), 0.01), rel=F64)
    assert local["privacy"]["sample_rate"] == 1.0 and ray["privacy"]["mode"] == "local"


@dataclasses.dataclass(frozen=True)
class _Seen(UpdateTransform):
    """Records each upload's change from the start the transforms were given (runs after local DP)."""

    log: list = dataclasses.field(default_factory=list, compare=False)

    def __call__(self, tensors, ctx):
        start = ctx.start or {}
        self.log.append((sorted(start) == sorted(tensors), float(torch.sqrt(sum(((tensors[k] - start[k]) ** 2).sum()
                                                                                 for k in start))),
                         float(sum(start[k].abs().sum() for k in start if k.endswith("lora_A.weight")))))
        return tensors, {}


def test_a_flora_client_clips_its_change_from_the_fresh_adapter_it_started_from(tiny_raw, tmp_path):
    tiny_raw.update(rounds=1, strategy={"name": "flora"}, privacy={"mode": "local", "clipping_norm": 1e-3,
                                                                    "noise_multiplier": 0.0, "delta": 0.01})
    sc = scenario_from_dict(tiny_raw)
    comp = resolve(sc)
    seen = _Seen()
    run_scenario(sc, tmp_path / "run", components=dataclasses.replace(comp, transforms=(*comp.transforms, seen)))
    assert len(seen.log) == 3
    for complete, change, a_mass in seen.log:
        assert complete and change <= sc.privacy.clipping_norm * (1 + F32_ELEMENTWISE) and a_mass > 0  # A starts random, as PEFT initialises it


def _news(tmp_path, raw):
    raw["data"] = news_data(tmp_path, rows=80)
    raw["partition"] = {"method": "iid"}
    return raw


def test_label_flipping_attackers_train_on_flipped_copies_and_every_row_names_them(tiny_raw, tmp_path):
    from fedsim.federation.prepare import prepare

    raw = _news(tmp_path, tiny_raw)
    raw.update(rounds=2)
    raw["clients"].update(per_round=8, malicious={"fraction": 0.25, "attack": "label_flip"})
    sc = scenario_from_dict(raw)
    clean = prepare(scenario_from_dict(raw, ["clients.malicious=null"]))
    prep = prepare(sc)
    bad = sc.clients.malicious.clients(8, sc.seed)
    opts = prep.data.options
    for c in range(8):
        before, after = clean.parts[c], prep.parts[c]
        assert len(before) == len(after)
        for i, j in zip(before, after):
            old, new = clean.data.train, prep.data.train
            p = int(old.prompt_len[i])
            assert np.array_equal(new.sample(j)[:p], old.sample(i)[:p])
            want = (int(old.label[i]) + 1) % 2 if c in bad else int(old.label[i])
            assert int(new.label[j]) == want and np.array_equal(new.sample(j)[p:], opts[want])
    assert np.array_equal(prep.data.test.ids, clean.data.test.ids)
    run_scenario(sc, tmp_path / "run")
    for row in _rows(tmp_path / "run")[1:]:
        assert row["malicious/clients"] == sorted(bad)
    with pytest.raises(Exception, match="label_flip flips classification labels"):
        scenario_from_dict(tiny_raw | {"data": {"source": "synthetic"}},
                           ["clients.malicious.attack=label_flip", "data.format=instruction"])
