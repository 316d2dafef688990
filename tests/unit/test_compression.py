"""Compressed communication (``compression``, :mod:`fedsim.pipeline.compression`): the codecs' wire format and bytes,
stochastic rounding's unbiasedness, error feedback's residual, and runs that upload and broadcast compressed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsim.pipeline.compression import UPLOADS, Codec, CompressUpload, encode_changes
from fedsim.pipeline.transforms import TransformContext


def _codec(method: str, **kw) -> Codec:
    return Codec(method, block_size=kw.get("block_size", 64), fraction=kw.get("fraction", 0.1))


@pytest.mark.parametrize("method", UPLOADS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (8, 129), (40, 100)])
def test_the_bytes_counted_are_the_bytes_serialized_and_read_back(method, shape):
    """to_bytes() is exactly nbytes = wire_bytes(numel) long (no header: the receiver knows the shape and the codec),
    and from_bytes() reads back what decode() gives; a short or long message is refused."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.01
    for codec in (_codec(method), _codec(method, fraction=0.01, block_size=1000)):
        enc = codec.encode(x, torch.Generator().manual_seed(2))
        data = enc.to_bytes()
        assert len(data) == enc.nbytes == codec.wire_bytes(x.numel())
        back = codec.from_bytes(data, shape)
        assert torch.equal(codec.decode(back), codec.decode(enc))
        assert codec.decode(enc).shape == x.shape and codec.decode(enc).dtype == torch.float32
        with pytest.raises(ValueError, match="too few"):
            codec.from_bytes(data[:-1], shape)
        with pytest.raises(ValueError, match="left over"):
            codec.from_bytes(data + b"\0", shape)


def test_wire_sizes_are_what_each_format_needs():
    n = 10_000
    assert _codec("fp16").wire_bytes(n) == _codec("bf16").wire_bytes(n) == 2 * n
    assert Codec("int8", block_size=1000).wire_bytes(n) == n + 10 * 8  # a code each, a float32 min and step a block
    assert Codec("int4", block_size=1000).wire_bytes(n + 1) == (n + 2) // 2 + 11 * 8  # two codes a byte
    assert Codec("topk", fraction=0.01).wire_bytes(n) == 100 * 4 + 100 * 4  # int32 indices, float32 values
    assert Codec("topk", fraction=0.1).wire_bytes(n) == n // 8 + 1000 * 4  # a bitmap is smaller than 1000 indices
    assert Codec("topk", fraction=1.0).wire_bytes(n) == n // 8 + n * 4


def _bias(rounding, x: torch.Tensor, draws: int, bits: int) -> float:
    """The largest |mean over draws − x| in units of the quantization step, for x quantized ``draws`` times (one
    block per draw, so each draw has x's own min and step)."""
    codec = Codec(f"int{bits}", block_size=x.numel())
    flat = x.repeat(draws)
    if rounding == "stochastic":
        dec = codec.decode(codec.encode(flat, torch.Generator().manual_seed(5)))
    else:  # round to nearest on the same grid: what the test must tell apart
        lo, step = x.min(), (x.max() - x.min()) / (2**bits - 1)
        dec = lo + torch.round((flat - lo) / step) * step
    step = float((x.max() - x.min()) / (2**bits - 1))
    return float((dec.view(draws, -1).double().mean(0) - x.double()).abs().max()) / step


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    """E[decoded] = x: over 4,000 draws each value's mean is within 5 standard errors (≤ step/(2√N) each) of x —
    where rounding to nearest on the same grid is off by a quarter of a step and more."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, generator=g) * 0.02 - 0.01
    draws = 4000
    assert _bias("stochastic", x, draws, bits) < 5 * 0.5 / math.sqrt(draws)
    assert _bias("nearest", x, draws, bits) > 0.25


def test_topk_sends_the_largest_entries_and_the_residual_is_carried_exactly():
    """Top-k keeps each tensor's k largest magnitudes; with error feedback the residual is (Δ + r) − sent bit for bit
    (zero where sent, the rest untouched), and the next round sends the top k of Δ' + r: nothing is lost, round after
    round."""
    g = torch.Generator().manual_seed(4)
    codec = Codec("topk", fraction=0.2)
    start = {"a": torch.randn(5, 20, generator=g)}
    residual = None
    for _ in range(4):
        trained = {"a": start["a"] + torch.randn(5, 20, generator=g) * 0.1}
        change = trained["a"] - start["a"] + (residual["a"] if residual else 0)
        out, left, wire, _ = encode_changes(codec, trained, start, residual, torch.Generator())
        sent = change - left["a"]
        assert int((sent != 0).sum()) == codec.kept(100) == 20
        kept = sent != 0
        assert torch.equal(left["a"][kept], torch.zeros(20)) and torch.equal(left["a"][~kept], change[~kept])
        assert torch.equal(sent[kept], change[kept])
        assert float(change[kept].abs().min()) >= float(change[~kept].abs().max())
        assert wire == {"a": codec.wire_bytes(100)}
        residual = left


def test_the_transform_keeps_its_state_and_leaves_a_corrupt_update_for_the_server():
    t = CompressUpload(Codec("topk", fraction=0.5), error_feedback=True)
    start = {"k": torch.zeros(4)}
    ctx = TransformContext(0, 1, 3, 1, start)
    sent = t({"k": torch.tensor([1.0, -3.0, 0.5, 2.0])}, ctx)
    assert torch.equal(sent.tensors["k"], torch.tensor([0.0, -3.0, 0.0, 2.0]))
    assert torch.equal(sent.state["k"], torch.tensor([1.0, 0.0, 0.5, 0.0]))
    assert sent.wire == {"k": 1 + 2 * 4} and t.keeps_state
    again = t({"k": torch.tensor([0.0, 0.0, 0.6, 0.0])}, TransformContext(0, 2, 3, 1, start, state=sent.state))
    assert torch.equal(again.tensors["k"], torch.tensor([1.0, 0.0, 1.1, 0.0]))  # the residual, carried in
    bad = t({"k": torch.tensor([float("nan"), 1.0, 1.0, 1.0])}, TransformContext(0, 3, 3, 1, start, state=sent.state))
    assert bad.state is None and torch.isnan(bad.tensors["k"][0])  # rejected by the server; the residual stays
    assert not CompressUpload(Codec("int8")).keeps_state


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _client_bytes(codec: Codec, raw: dict, tmp_path) -> int:
    """One client's upload at the scenario's rank: every adapted module's A and B, serialized."""
    from fedsim.config import scenario_from_dict
    from fedsim.federation.prepare import prepare

    spec = prepare(scenario_from_dict(raw)).spec
    r = spec.lora.rank
    return sum(len(codec.encode(torch.zeros(shape), torch.Generator()).to_bytes())
               for s in spec.shapes.values() for shape in ((r, s.d_in), (s.d_out, r)))


def test_a_run_uploads_topk_with_error_feedback_kept_in_the_client_state_store(tiny_raw, tmp_path):
    """Every client trains both rounds: each uploads exactly the serialized size (comm/up_bytes, the clock's
    bytes), and keeps a residual per adapter tensor in the client state store (checkpointed) — zero where it sent."""
    from fedsim import checkpoint
    from fedsim.client.store import ClientStateStore
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = {**tiny_raw, "compression": {"upload": "topk", "topk_fraction": 0.25}}
    raw["clients"] = {**raw["clients"], "per_round": 8}
    out = tmp_path / "run"
    run_scenario(scenario_from_dict(raw), out)
    per_client = _client_bytes(Codec("topk", fraction=0.25), raw, tmp_path)
    rows = [r for r in _rows(out) if r["round"] >= 1]
    for r in rows:
        assert r["comm/up_bytes"] == 8 * per_client < r["comm/up_params"] * 4 / 3
        assert all(c[1] == per_client for c in r["comm/per_client"].values())
        assert 0 < r["compress/rel_error"] < 1
    checkpoint.restore_client_state(checkpoint.load(out)[3], tmp_path / "state")
    store = ClientStateStore.open(tmp_path / "state")
    for c in range(8):
        state = store.get(c)
        assert state and all(k.startswith("transform.compression.") for k in state)
        zeros = sum(int((v == 0).sum()) for v in state.values())
        assert zeros >= sum(Codec("topk", fraction=0.25).kept(v.numel()) for v in state.values())


def test_a_run_broadcasts_int8_and_counts_its_bytes(tiny_raw, tmp_path):
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = {**tiny_raw, "compression": {"download": "int8", "block_size": 64}, "rounds": 1}
    out = tmp_path / "run"
    run_scenario(scenario_from_dict(raw), out)
    per_client = _client_bytes(Codec("int8", block_size=64), raw, tmp_path)
    row = _rows(out)[-1]
    assert row["comm/down_bytes"] == 3 * per_client and row["comm/up_bytes"] == row["comm/up_params"] * 4
    assert "compress/rel_error" not in row


def test_privacy_runs_before_compression_and_the_accountant_is_unchanged(tiny_raw):
    """Local DP clips and noises before the upload is encoded (post-processing: ε unchanged); an attacker's update
    is encoded like any other; the compression comes last."""
    from fedsim.components import privacy_line, resolve
    from fedsim.config import scenario_from_dict
    from fedsim.pipeline.privacy import LocalPrivacy
    from fedsim.pipeline.transforms import Attack

    raw = {**tiny_raw, "privacy": {"mode": "local", "clipping_norm": 1.0, "noise_multiplier": 0.5},
           "clients": {**tiny_raw["clients"], "malicious": {"fraction": 0.25, "attack": "sign_flip"}}}
    plain = scenario_from_dict(raw)
    packed = scenario_from_dict({**raw, "compression": {"upload": "int8"}})
    kinds = [type(t) for t in resolve(packed).transforms]
    assert kinds == [LocalPrivacy, Attack, CompressUpload]
    strategy = resolve(plain).strategy
    assert privacy_line(packed, strategy) == privacy_line(plain, strategy)


@pytest.mark.parametrize(("section", "strategy", "says"), [
    ({"upload": "int8"}, "local", "compression: strategy 'local' uploads nothing"),
    ({"upload": "topk"}, "flora", "compression.error_feedback: FLoRA's clients start a fresh adapter each round"),
    ({"download": "int8", "error_feedback": True}, "fedit", "compression: error_feedback keeps what a compressed"),
    ({}, "fedit", "compression: nothing to compress"),
    ({"upload": "int3"}, "fedit", "compression.upload: Input should be 'none', 'fp16'"),
    ({"upload": "topk", "topk_fraction": 0}, "fedit", "compression.topk_fraction: Input should be greater than 0"),
])
def test_bad_compression_is_one_line(tiny_raw, section, strategy, says):
    from fedsim.components import resolve
    from fedsim.config import scenario_from_dict
    from fedsim.errors import ScenarioError

    raw = {**tiny_raw, "compression": section, "strategy": {"name": strategy}}
    if strategy == "local":
        raw["eval"] = {**raw["eval"], "local_test_fraction": 0.25}
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(raw))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


@pytest.mark.usefixtures("shared_ray")
def test_ray_with_packed_clients_equals_the_local_backend(tiny_raw, tmp_path):
    """Top-k uploads with error feedback (the residual through the client state store, two visits per client) and
    an int8 broadcast give the same numbers on Ray, packed, as on the local backend."""
    from tolerances import F32_NETWORK

    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    tiny_raw.update(compression={"upload": "topk", "topk_fraction": 0.3, "download": "int8", "block_size": 32})
    tiny_raw["clients"] = {**tiny_raw["clients"], "per_round": 8}
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.clients_per_pass=3"]),
                 tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(a) == len(b) == 3 and b[-1]["train/clients_per_pass"] > 1
    for ra, rb in zip(a, b):
        for k in ("eval/loss", "train/loss", "compress/rel_error", "comm/up_bytes", "comm/down_bytes"):
            assert (k in ra) == (k in rb) == (k == "eval/loss" or ra["round"] > 0), (ra["round"], k)
            assert ra.get(k) == pytest.approx(rb.get(k), rel=F32_NETWORK) if k in ra else True, (ra["round"], k)


def test_a_classifiers_head_travels_compressed_both_ways(tiny_raw, tmp_path):
    """With a head trained in full (seq_cls), everything a client uploads is encoded — the adapter and the head —
    and so is the broadcast's global head: each direction's bytes are the codec's sizes of every tensor."""
    from conftest import ROBERTA, classifier_raw

    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare, run_scenario
    from fedsim.models.tasks import task_for

    raw = classifier_raw(tiny_raw, tmp_path, ROBERTA)
    raw.update(rounds=2, compression={"upload": "int8", "download": "int4", "block_size": 64})
    sc = scenario_from_dict(raw)
    spec = prepare(sc).spec
    r = spec.lora.rank
    adapter = [r * s.d_in for s in spec.shapes.values()] + [r * s.d_out for s in spec.shapes.values()]
    from fedsim.models.base import build_base_model

    task = task_for(sc.model)
    model = build_base_model(sc.model, "cpu", task.classes, num_labels=2)  # the head's tensors
    head = [p.numel() for n, p in model.named_parameters() if n.split(".")[0] in task.head_names]
    assert head
    out = tmp_path / "run"
    run_scenario(sc, out)
    rows = [r for r in _rows(out) if r["round"] >= 1]
    up8, down4 = Codec("int8", block_size=64), Codec("int4", block_size=64)
    for row in rows:
        assert row["comm/up_bytes"] == 3 * sum(up8.wire_bytes(n) for n in adapter + head)
    assert rows[0]["comm/down_bytes"] == 3 * sum(down4.wire_bytes(n) for n in adapter)  # the base's head at first
    assert rows[1]["comm/down_bytes"] == 3 * sum(down4.wire_bytes(n) for n in adapter + head)
