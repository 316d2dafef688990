import numpy as np
import torch
from tolerances import F32_NETWORK

from fedsim.data.datasets import TokenizedData, TokenizedSplit, load_data
from fedsim.eval.metrics import reduce_eval
from fedsim.eval.scoring import evaluate_batch
from fedsim.models import base as base_mod
from fedsim.models.base import build_base_model, target_shapes
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientPayload, ClientSpec, LoraSpec


def _split(seqs, prompt_lens, tasks):
    ids = np.concatenate(seqs).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    n = len(seqs)
    return TokenizedSplit(ids, offsets, np.asarray(prompt_lens, np.int32), np.full(n, -1, np.int32),
                          np.asarray(tasks, np.int32), np.full(n, -1, np.int32))


@torch.no_grad()
def test_teacher_forced_exact_match_equals_greedy_decoding(tiny_scenario):
    model = build_base_model(tiny_scenario.model)
    rng = np.random.default_rng(0)
    seqs, plens, tasks = [], [], []
    for i in range(6):
        prompt = rng.integers(3, 300, size=5)
        ids = torch.as_tensor(prompt[None], dtype=torch.long)
        for _ in range(3):  # greedy decoding, 3 tokens
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        greedy = ids[0].numpy()
        if i % 2:  # corrupt one answer token: no longer what greedy decoding produces
            greedy = greedy.copy()
            greedy[5 + i % 3] = (greedy[5 + i % 3] + 1) % 384
        seqs.append(greedy)
        plens.append(5)
        tasks.append(i % 2)
    data = TokenizedData(train=_split(seqs, plens, tasks), test=_split(seqs, plens, tasks),
                         task_names=["kept", "corrupted"], group_names=[])
    sums = evaluate_batch(model, data, np.arange(6), torch.device("cpu"))
    assert sums["correct"] == 3.0 and sums["task/kept/correct"] == 3.0 and sums["task/corrupted/correct"] == 0.0
    out = reduce_eval([sums])
    assert out["eval/accuracy"] == 0.5 and out["eval/task/kept/accuracy"] == 1.0


@torch.no_grad()
def test_scoring_only_labelled_positions_equals_scoring_every_position(tiny_scenario):
    """The LM head runs only where some row has a label (logits_to_keep); the sums equal those of full logits."""
    from fedsim.client.batching import IGNORE, collate
    from fedsim.models.tasks.causal_lm import CausalLM

    model = build_base_model(tiny_scenario.model)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 300, size=n) for n in (9, 14, 6, 11)]  # different lengths: right padding
    plens = [4, 10, 2, 7]
    split = _split(seqs, plens, [0, 0, 0, 0])
    batch = collate(split, np.arange(4), 0)
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    valid = target != IGNORE
    full = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want_loss = float(full.masked_fill(~valid, 0).sum())
    want_hit = ((logits.argmax(-1) == target.clamp(min=0)) | ~valid).all(1)
    for forward_takes_it in (True, False):
        model._fedsim_logits_to_keep = forward_takes_it
        logp, hit = CausalLM().token_scores(model, batch)
        assert logp.shape[1] == int(valid.any(0).sum()) < target.shape[1]
        assert abs(float(logp.sum()) - want_loss) <= F32_NETWORK * abs(want_loss)
        assert torch.equal(hit.all(1), want_hit)


def test_training_loss_at_labelled_positions_equals_transformers_loss(tiny_scenario):
    """causal_lm_loss (the LM head only where a label is scored) is transformers' causal-LM loss, value and
    gradients, with and without logits_to_keep; a batch without labels gives NaN, as transformers'."""
    from fedsim.client.batching import collate
    from fedsim.models.lm_loss import causal_lm_loss

    model = build_base_model(tiny_scenario.model)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 300, size=n) for n in (9, 14, 6, 11)]
    batch = collate(_split(seqs, [4, 10, 2, 7], [0, 0, 0, 0]), np.arange(4), 0)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    want = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    want_grads = torch.autograd.grad(want, params)
    for forward_takes_it in (True, False):
        model._fedsim_logits_to_keep = forward_takes_it
        got = causal_lm_loss(model, batch["input_ids"], batch["labels"])
        assert abs(float(got) - float(want)) <= F32_NETWORK * float(want)
        for g, w in zip(torch.autograd.grad(got, params), want_grads):
            assert torch.allclose(g, w, rtol=F32_NETWORK, atol=F32_NETWORK)
    empty = torch.full_like(batch["labels"], -100)
    assert torch.isnan(causal_lm_loss(model, batch["input_ids"], empty))


def test_fused_lora_forward_equals_peft(tiny_scenario):
    """The fused LoRA forward (scaling and residual add inside one addmm) gives PEFT's outputs and gradients — one
    adapter, two active adapters with mixing weights, dropout — and hands what it does not cover (adapters off or
    merged) to PEFT's own forward."""
    from peft.tuners.lora.layer import Linear

    from fedsim.models.adapters import AdapterHost, fused_lora_forward

    host = AdapterHost(build_base_model(tiny_scenario.model), tiny_scenario.model.target_modules, lora_dropout=0.1)
    main, personal = LoraSpec(4, 8.0), LoraSpec(2, 4.0)
    host.activate(main, personal, (0.3, 0.7))
    mods = [m for m in host.model.modules() if type(m) is Linear]
    assert mods and all("forward" in m.__dict__ for m in mods)  # installed on every plain LoRA layer
    torch.manual_seed(0)
    params = host.set_trainable(main, ("A", "B")) + host.set_trainable(personal, ("A", "B"), personal=True)
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(3, 300, (3, 12))
    host.model.train()

    def run(fused):
        for m in mods:
            if fused:
                m.forward = fused_lora_forward.__get__(m)
            else:
                m.__dict__.pop("forward", None)
        torch.manual_seed(5)  # the same dropout masks
        out = host.model(input_ids=ids).logits
        return out, torch.autograd.grad(out.square().sum(), params)

    def close(a, b):  # float rounding only: relative to the tensor's scale
        return float((a - b).abs().max()) <= F32_NETWORK * float(b.abs().max())

    (out_f, g_f), (out_p, g_p) = run(True), run(False)
    assert close(out_f, out_p) and all(close(a, b) for a, b in zip(g_f, g_p))
    assert float(g_p[0].abs().max()) > 0
    host.model.eval()
    with torch.no_grad():
        on = host.model(input_ids=ids).logits
        with host.model.disable_adapter():  # handed to PEFT: the base alone
            off = host.model(input_ids=ids).logits
        base = build_base_model(tiny_scenario.model)(input_ids=ids).logits  # the same seeded weights
    assert torch.equal(off, base) and not torch.allclose(on, base)


def test_target_shapes_of_tiny_model(tiny_scenario):
    shapes = target_shapes(tiny_scenario.model)
    assert len(shapes) == 7  # one layer, seven projections
    assert shapes["model.layers.0.mlp.down_proj"].d_in == 64 and shapes["model.layers.0.mlp.down_proj"].d_out == 32


def test_linear_shapes_are_remembered_and_match_the_model(tiny_scenario, tmp_path, monkeypatch):
    from fedsim.models import base

    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    built = []
    real = base._meta_shapes
    monkeypatch.setattr(base, "_meta_shapes", lambda cfg, cls: built.append(cfg) or real(cfg, cls))
    cfg = tiny_scenario.model
    first = base.linear_shapes(cfg)
    model = build_base_model(cfg)
    assert first == {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    assert base.linear_shapes(cfg) == first and len(built) == 1  # the second call reads the cache
    from fedsim.models.quant import quantizable_layers

    assert base.decoder_linear_shapes(cfg) == {n: (m.out_features, m.in_features)
                                               for n, m in quantizable_layers(model).items()}
    wider = cfg.model_copy(update={"tiny": cfg.tiny.model_copy(update={"intermediate_size": 160})})
    assert base.target_shapes(wider)["model.layers.0.mlp.up_proj"].d_out == 160 and len(built) == 2
    for f in (tmp_path / "shapes").glob("*.json"):
        f.write_text("{not json")  # a damaged entry is rebuilt
    assert base.linear_shapes(cfg) == first and len(built) == 3
    import json

    edited = 0
    for f in (tmp_path / "shapes").glob("*.json"):  # #45: an entry edited by hand gave a bare shape mismatch later
        if f.read_text().startswith("{not"):
            continue  # the wider model's, still damaged
        entry = json.loads(f.read_text())
        for v in entry["found"]["shapes"].values():
            v[1] += 1
        f.write_text(json.dumps(entry))
        edited += 1
    assert edited == 1 and base.linear_shapes(cfg) == first and len(built) == 4  # rebuilt, not believed


def test_adapter_config_written_without_peft_reads_back_as_peft_writes_it(tmp_path):
    from peft import LoraConfig

    from fedsim.config import scenario_from_dict
    from fedsim.lora.merge import ExportedAdapter
    from fedsim.models.adapter_io import save_peft_adapter

    sc = scenario_from_dict({"model": {"name": "tiny", "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}})
    adapter = ExportedAdapter(tensors={}, lora=LoraSpec(8, 16.0, rslora=True),
                              rank_pattern={"model.layers.0.self_attn.q_proj": 3},
                              alpha_pattern={"model.layers.0.self_attn.q_proj": 3.0})
    save_peft_adapter(adapter, sc, tmp_path)
    want = LoraConfig(r=8, lora_alpha=16.0, use_rslora=True, rank_pattern=dict(adapter.rank_pattern),
                      alpha_pattern=dict(adapter.alpha_pattern), target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", base_model_name_or_path="tiny")
    got = LoraConfig.from_pretrained(str(tmp_path)).to_dict()
    assert got == want.to_dict()


def test_worker_builds_and_wraps_once_and_swaps_weights(tiny_scenario, monkeypatch):
    builds = []
    real_build = base_mod.build_base_model
    monkeypatch.setattr(base_mod, "build_base_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    import peft

    wraps = []
    real_wrap = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: wraps.append(1) or real_wrap(*a, **k))

    data = load_data(tiny_scenario)
    w = Worker(tiny_scenario, data)
    lora = LoraSpec(4, 8.0)
    spec = StrategySpec(target_shapes(tiny_scenario.model), lora, seed=0)
    state = make_strategy("fedit").init_state(spec)
    payload = ClientPayload(tensors=state.tensors, lora=lora)
    updates = []
    for cid in range(5):
        job = ClientJob(ClientSpec(cid, 30, lora), np.arange(cid * 30, cid * 30 + 30), server_round=1)
        res, up = w.run_client(job, payload)
        updates.append(up)
        assert res.metrics["train/steps"] == 3 and np.isfinite(res.metrics["train/loss"])
    assert len(builds) == 1 and len(wraps) == 1
    assert w.stats()["num_builds"] == 1 and w.stats()["num_wraps"] == 1 and w.stats()["num_clients"] == 5
    # each client started from the payload, not from the previous client's weights
    w.host().load(lora, payload.tensors)
    assert all(torch.equal(v, payload.tensors[k]) for k, v in w.host().read(lora).items())
    # and training moved the adapter away from it, differently per client
    k = next(iter(payload.tensors))
    assert not torch.equal(updates[0].tensors[k], payload.tensors[k])
    assert not torch.equal(updates[0].tensors[k], updates[1].tensors[k])
    # same job twice → same update (randomness from (seed, round, client) only)
    _, again = w.run_client(ClientJob(ClientSpec(0, 30, lora), np.arange(30), 1), payload)
    assert all(torch.equal(again.tensors[k], updates[0].tensors[k]) for k in again.tensors)
