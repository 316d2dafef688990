"""Load rows (built-in synthetic tasks, local files or the Hugging Face hub), format them into prompt → response
pairs and tokenize them once into compact numpy arrays (cached on disk, shared with workers through the object store).

Instruction data: the loss covers the response tokens (and EOS) only. Classification data is formatted the same way
with the label name as the response; its accuracy scores each label option.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import DataConfig, Scenario
from fedsim.errors import DataError, ScenarioError

CACHE_VERSION = 1
_EXT_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def cache_dir() -> Path:
    """Where fedsim caches tokenized data: ``$FEDSIM_CACHE_DIR`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE_DIR", Path.home() / ".cache" / "fedsim"))


@dataclass
class TokenizedSplit:
    """One tokenized split, stored flat: sample i is ``ids[offsets[i]:offsets[i+1]]`` and its first
    ``prompt_len[i]`` tokens are the prompt."""

    ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    prompt_len: np.ndarray  # (n,) int32
    label: np.ndarray  # (n,) int32: index into label options, -1 for instruction data
    task: np.ndarray  # (n,) int32: index into task_names, -1 where the data has no task field
    group: np.ndarray  # (n,) int32: index into group_names (the partition field), -1 if none

    def __len__(self) -> int:
        return len(self.prompt_len)

    def sample(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class TokenizedData:
    """Tokenized train and test splits plus the names their integer codes refer to."""

    train: TokenizedSplit
    test: TokenizedSplit
    task_names: list[str]
    group_names: list[str]
    label_names: list[str] = field(default_factory=list)
    options: list[np.ndarray] = field(default_factory=list)  # tokenized label options (classification)
    pad_id: int = 0
    eos_id: int = 1


# --------------------------------------------------------------------------------------------------------------
# raw rows


def _is_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or os.path.splitext(source)[1].lower() in _EXT_BUILDERS
        or any(ch in source for ch in "*?[")
        or os.path.exists(source)
    )


def _local_files(source: str, field_name: str) -> list[str]:
    """The files a local data source names (a file, a directory's data files, or a glob), sorted.

    Raises:
        ScenarioError: none exist, or their formats cannot be read together.
    """
    path = os.path.expanduser(source)
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.splitext(f)[1].lower() in _EXT_BUILDERS)
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise ScenarioError(field_name, f"no data file found at {source!r}",
                            "give an existing .json/.jsonl/.csv/.tsv/.parquet file, a directory or a glob")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    builders = {_EXT_BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise ScenarioError(field_name, f"cannot read files with extensions {sorted(exts)} together",
                            "use one of .json, .jsonl, .csv, .tsv, .parquet")
    return files


def data_files(cfg: DataConfig) -> list[str]:
    """Every local file the data settings read (none for synthetic or hub data)."""
    files: list[str] = []
    for source, name in ((cfg.source, "data.source"), (cfg.test.source, "data.test.source")):
        if source is not None and source != "synthetic" and _is_local(source):
            files += _local_files(source, name)
    return files


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, inode, size, mtime, ctime) -> SHA-256


def file_digest(path: str) -> str:
    """SHA-256 of a file's contents (remembered for this process while its inode, size, mtime and ctime stay the
    same; ctime changes with every write, even one that puts the mtime back)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def data_digests(cfg: DataConfig) -> dict[str, str]:
    """{absolute path: SHA-256} of every local data file the settings read."""
    return {os.path.abspath(f): file_digest(f) for f in data_files(cfg)}


def _check_text_file(path: str, kind: str) -> None:
    """A data file a text reader will parse: not empty, UTF-8, no NUL bytes.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if b"\x00" in chunk:
                at = offset + chunk.index(b"\x00")
                raise DataError(f"{path} is not a {kind} (it holds binary data: a NUL byte at offset {at}); "
                                f"give a text {kind} file")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (byte 0x{chunk[e.start]:02x} at offset {offset + e.start});"
                                " convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            blank = blank and not text.strip()
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (it ends inside a multi-byte character at offset {offset})") \
            from None
    if blank:
        raise DataError(f"{path}: the file is empty; give a file with at least one row")


def _check_jsonl(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not JSON ({e.msg} at column {e.colno}); "
                                "every line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n} is a JSON {type(row).__name__}, not an object with fields")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _check_csv_columns(path: str, columns: tuple[str, ...], delimiter: str) -> None:
    """With ``data.columns`` (a header-less file): the file's width matches and its first line is not a header."""
    import csv
    import itertools

    with open(path, encoding="utf-8", newline="") as f:
        lines = [row for row in itertools.islice(csv.reader(f, delimiter=delimiter), 50) if row]
    first = lines[0]
    if len(first) != len(columns):
        raise DataError(f"{path} has {len(first)} column(s) per row but data.columns names {len(columns)} "
                        f"({list(columns)}); name one column per field")
    rest = lines[1:]
    looks_like_header = [c.strip().lower() for c in first] == [c.lower() for c in columns] or any(
        rest and not _is_number(first[j]) and all(len(r) > j and _is_number(r[j]) for r in rest)
        for j in range(len(first)))
    if looks_like_header:
        raise DataError(f"{path} starts with a header row ({', '.join(first)}) but data.columns says it has none; "
                        "remove data.columns to use the file's own header, or delete the header line")


def _check_file(path: str, builder: str, cfg: DataConfig) -> None:
    """Say what is wrong with a data file in words, before a reader fails on it with its own exception."""
    kind = {"json": "JSON file", "csv": "CSV table", "parquet": "Parquet file"}[builder]
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty; give a file with at least one row")
    if builder == "parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise DataError(f"{path} is not a Parquet file (it does not start with PAR1)")
        return
    _check_text_file(path, kind)
    if builder == "json" and path.lower().endswith(".jsonl"):
        _check_jsonl(path)
    if builder == "csv" and cfg.columns:
        _check_csv_columns(path, cfg.columns, "\t" if path.lower().endswith(".tsv") else ",")


def _root_cause(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _datasets_load() -> Any:
    """``datasets.load_dataset``, in a process where pyarrow may have been kept out (:mod:`fedsim.runtime.boot`)."""
    from fedsim.runtime.boot import allow_pyarrow

    allow_pyarrow()
    from datasets import load_dataset

    return load_dataset


def _load_local(source: str, cfg: DataConfig, field_name: str) -> list[dict[str, Any]]:
    load_dataset = _datasets_load()

    files = _local_files(source, field_name)
    builder = _EXT_BUILDERS[os.path.splitext(files[0])[1].lower()]  # _local_files allows one reader only
    for f in files:
        _check_file(f, builder, cfg)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        if any(f.lower().endswith(".tsv") for f in files):
            kwargs["delimiter"] = "\t"
        if cfg.columns:
            kwargs["column_names"] = list(cfg.columns)
    import tempfile

    # a private, throw-away datasets cache: its own is keyed on path and mtime, and would serve an edited file's
    # old rows (ours, keyed on the contents, is the one that persists)
    try:
        with tempfile.TemporaryDirectory(prefix="fedsim-read-") as tmp:
            return load_dataset(builder, data_files=files, split="train", cache_dir=tmp, **kwargs).to_list()
    except Exception as e:  # datasets raises many types for malformed files; say what the reader itself said
        root = _root_cause(e)
        what = {"json": "JSON", "csv": "a CSV table", "parquet": "Parquet"}[builder]
        raise DataError(f"{field_name}: cannot load {source!r}: it is not {what} that can be read "
                        f"({root.__class__.__name__}: {str(root) or 'no message'})") from None


def _load_hub(name: str, subset: str | None, split: str, field_name: str) -> list[dict[str, Any]]:
    load_dataset = _datasets_load()

    try:
        ds = load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(
            f"{field_name}: cannot load {name!r} (split {split!r}) from the Hugging Face hub: "
            f"{e.__class__.__name__}: {e}. Check the name and your network, or point {field_name} at a local file."
        ) from None
    return ds.to_list()


def load_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Raw train rows and, when a separate test source or split exists, raw test rows (else None)."""
    if cfg.source == "synthetic":
        s = cfg.synthetic
        train = _synthetic(s.tasks, s.num_train, s.seed)
        test = _synthetic(s.tasks, s.num_test, s.seed + 1_000_003)
        return train, test
    train = (_load_local(cfg.source, cfg, "data.source") if _is_local(cfg.source)
             else _load_hub(cfg.source, cfg.subset, cfg.split, "data.source"))
    test = None
    if cfg.test.source is not None:
        src = cfg.test.source
        test = (_load_local(src, cfg, "data.test.source") if _is_local(src)
                else _load_hub(src, cfg.subset, cfg.test.split or "test", "data.test.source"))
    elif cfg.test.split is not None:
        if _is_local(cfg.source):
            raise ScenarioError("data.test.split", "a split name only applies to hub data sets",
                                "use data.test.source (a file) or data.test.fraction for local data")
        test = _load_hub(cfg.source, cfg.subset, cfg.test.split, "data.test.split")
    return train, test


def _synthetic(tasks: tuple[str, ...], n: int, seed: int) -> list[dict[str, Any]]:
    from fedsim.data.synthetic import generate

    return generate(tasks, n, seed)


# --------------------------------------------------------------------------------------------------------------
# formatting


def _check_fields(rows: list[dict[str, Any]], needed: list[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where} holds no rows")
    missing = [f for f in needed if f not in rows[0]]
    if missing:
        raise ScenarioError(
            "data", f"{where} has no field(s) {missing}; its fields are {sorted(rows[0])}",
            "set data.prompt_template / data.response_field / data.label_field / data.task_field to existing fields",
        )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None, or NaN (an empty CSV cell)


def _check_values(rows: list[dict[str, Any]], fields: list[str], where: str) -> None:
    """Every row has a value for every field the formatting reads (not only the first row).

    Raises:
        DataError: naming the first row without one (counting rows from 1, as they come in the file).
    """
    for i, row in enumerate(rows, start=1):
        for f in fields:
            if _missing(row.get(f)):
                raise DataError(f"{where} row {i} has no value for {f!r} (missing, null or an empty cell); "
                                "fill it in or drop the row")


def _template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _label_name(cfg: DataConfig, raw: Any) -> str:
    if cfg.label_names is None:
        return str(raw)
    for key in (raw, str(raw)):
        if key in cfg.label_names:
            return cfg.label_names[key]
    try:
        ik = int(raw)
        if ik in cfg.label_names:
            return cfg.label_names[ik]
    except (TypeError, ValueError):
        pass
    raise DataError(f"label {raw!r} is not in data.label_names {sorted(map(str, cfg.label_names))}")


def format_rows(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> list[tuple[str, str, str | None, str]]:
    """Rows → (prompt, response, task or None, label name or '') tuples."""
    template = cfg.template()
    needed = _template_fields(template)
    needed.append(cfg.response_field if cfg.format == "instruction" else cfg.label_field)
    _check_fields(rows, needed, where)
    has_task = cfg.task_field is not None and cfg.task_field in rows[0]
    out = []
    for r in rows:
        prompt = template.format(**{k: r[k] for k in _template_fields(template)})
        if cfg.format == "instruction":
            response, label = str(r[cfg.response_field]), ""
        else:
            label = _label_name(cfg, r[cfg.label_field])
            response = label
        out.append((prompt, response, str(r[cfg.task_field]) if has_task else None, label))
    return out


# --------------------------------------------------------------------------------------------------------------
# tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokenize_split(formatted: list[tuple[str, str, str | None, str]], groups: list[str | None], tokenizer: Any,
                    max_len: int, task_index: dict[str, int], group_index: dict[str, int],
                    label_index: dict[str, int]) -> TokenizedSplit:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    offsets = [0]
    prompt_len, labels, tasks, grp = [], [], [], []
    for (prompt, response, task, label), g in zip(formatted, groups):
        p = bos + _encode(tokenizer, prompt)
        r = _encode(tokenizer, response) + [eos]
        r = r[: max_len - 1]  # keep at least one prompt token
        p = p[-(max_len - len(r)) :]  # truncate the prompt from the left so the answer survives
        ids.extend(p + r)
        offsets.append(len(ids))
        prompt_len.append(len(p))
        labels.append(label_index.get(label, -1))
        tasks.append(task_index[task] if task is not None else -1)
        grp.append(group_index[g] if g is not None else -1)
    return TokenizedSplit(
        ids=np.asarray(ids, dtype=np.int32), offsets=np.asarray(offsets, dtype=np.int64),
        prompt_len=np.asarray(prompt_len, dtype=np.int32), label=np.asarray(labels, dtype=np.int32),
        task=np.asarray(tasks, dtype=np.int32), group=np.asarray(grp, dtype=np.int32),
    )


def partition_field(scenario: Scenario) -> str | None:
    """The field the partitioner groups by: ``partition.by``, else the label (classification) or the task field."""
    if scenario.partition.by:
        return scenario.partition.by
    return scenario.data.label_field if scenario.data.format == "classification" else scenario.data.task_field


def _cache_key(scenario: Scenario) -> str:
    """The settings and the contents (SHA-256) of every local file read: an edited file is read anew."""
    blob = json.dumps({
        "v": CACHE_VERSION, "data": scenario.data.model_dump(mode="json"), "model": scenario.model.name,
        "revision": scenario.model.revision, "by": partition_field(scenario), "seed": scenario.seed,
        "files": data_digests(scenario.data),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _save(path: Path, data: TokenizedData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        s = getattr(data, split)
        for f in ("ids", "offsets", "prompt_len", "label", "task", "group"):
            arrays[f"{split}.{f}"] = getattr(s, f)
    for i, o in enumerate(data.options):
        arrays[f"option.{i}"] = o
    meta = {"task_names": data.task_names, "group_names": data.group_names, "label_names": data.label_names,
            "pad_id": data.pad_id, "eos_id": data.eos_id}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> TokenizedData:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        splits = {}
        for split in ("train", "test"):
            splits[split] = TokenizedSplit(**{f: z[f"{split}.{f}"] for f in
                                              ("ids", "offsets", "prompt_len", "label", "task", "group")})
        options = [z[f"option.{i}"] for i in range(len(meta["label_names"]))]
    return TokenizedData(train=splits["train"], test=splits["test"], options=options, **meta)


def load_data(scenario: Scenario, tokenizer: Any | None = None, use_cache: bool = True) -> TokenizedData:
    """Load, format and tokenize the scenario's data (cached in ``cache_dir()/tokenized`` under a hash of the data
    settings and of the contents of the local files read).

    Raises:
        ScenarioError, DataError: missing files or fields, an empty split.
    """
    key = _cache_key(scenario)
    path = cache_dir() / "tokenized" / f"{key}.npz"
    if use_cache and path.is_file():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is rebuilt below
    if tokenizer is None:
        from fedsim.models.base import load_tokenizer

        tokenizer = load_tokenizer(scenario.model)
    cfg = scenario.data
    train_rows, test_rows = load_rows(cfg)
    if cfg.max_train_samples is not None:
        train_rows = train_rows[: cfg.max_train_samples]
    needed = _template_fields(cfg.template()) + [cfg.response_field if cfg.format == "instruction" else cfg.label_field]
    _check_fields(train_rows, needed, "training data")
    present = [f for f in (cfg.task_field, partition_field(scenario)) if f is not None and f in train_rows[0]]
    _check_values(train_rows, needed + present, "data.source")
    if test_rows is not None:
        _check_fields(test_rows, needed, "test data")
        _check_values(test_rows, needed + [f for f in present if f in test_rows[0]],
                      "data.test.source" if cfg.test.source is not None else f"data split {cfg.test.split!r}")
    if test_rows is None:
        frac = cfg.test.fraction or 0.1
        rng = np.random.default_rng([scenario.seed, 7])
        perm = rng.permutation(len(train_rows))
        n_test = max(1, int(round(frac * len(train_rows))))
        test_rows = [train_rows[i] for i in perm[:n_test]]
        train_rows = [train_rows[i] for i in sorted(perm[n_test:])]
        if not train_rows:
            raise DataError(f"data.source holds {len(perm)} row(s): too few to hold out a test fraction of {frac}; "
                            "add rows or give data.test.source")
    if cfg.test.max_samples is not None and len(test_rows) > cfg.test.max_samples:
        rng = np.random.default_rng([scenario.seed, 11])
        keep = sorted(rng.choice(len(test_rows), size=cfg.test.max_samples, replace=False))
        test_rows = [test_rows[i] for i in keep]
    train_f = format_rows(train_rows, cfg, "training data")
    test_f = format_rows(test_rows, cfg, "test data")

    gfield = partition_field(scenario)
    train_groups: list[str | None] = [None] * len(train_rows)
    if gfield is not None:
        if gfield not in train_rows[0]:
            if scenario.partition.method in ("dirichlet", "shards", "natural") or scenario.partition.by:
                raise ScenarioError("partition.by", f"field {gfield!r} is not in the training data "
                                    f"(fields: {sorted(train_rows[0])})", "name an existing label/category field")
        else:
            train_groups = [str(r[gfield]) for r in train_rows]
    task_names = sorted({t for _, _, t, _ in train_f + test_f if t is not None})
    group_names = sorted({g for g in train_groups if g is not None})
    label_names: list[str] = []
    if cfg.format == "classification":
        label_names = sorted({lab for *_, lab in train_f + test_f})
    task_index = {t: i for i, t in enumerate(task_names)}
    group_index = {g: i for i, g in enumerate(group_names)}
    label_index = {lab: i for i, lab in enumerate(label_names)}
    max_len = cfg.max_seq_len
    data = TokenizedData(
        train=_tokenize_split(train_f, train_groups, tokenizer, max_len, task_index, group_index, label_index),
        test=_tokenize_split(test_f, [None] * len(test_f), tokenizer, max_len, task_index, group_index, label_index),
        task_names=task_names, group_names=group_names, label_names=label_names,
        options=[np.asarray(_encode(tokenizer, lab) + [tokenizer.eos_token_id], dtype=np.int32) for lab in label_names],
        pad_id=int(tokenizer.pad_token_id), eos_id=int(tokenizer.eos_token_id),
    )
    if use_cache:
        try:
            _save(path, data)
        except OSError:
            pass  # an unwritable cache only costs time
    return data
