"""Raw rows: the built-in synthetic tasks, local files (JSON/JSONL, CSV/TSV, Parquet: a file, a directory or a glob)
or a Hugging Face hub data set; and the digests that tie a run to the contents of the files it read."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

from fedsim.config import DataConfig
from fedsim.config.paths import RELATIVE
from fedsim.data.origins import Origins, Part
from fedsim.errors import DataError, ScenarioError

_EXT_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


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
    elif os.path.exists(path):
        files = [path]
    else:
        files = []
    odd = [f for f in files if not os.path.isfile(f)]  # a directory, a FIFO (whose read would block), a socket
    if odd:
        raise ScenarioError(field_name, f"{odd[0]!r} is not a regular file (a directory, a pipe or a device)",
                            "point the data source at data files only")
    if not files:
        raise ScenarioError(field_name, f"no data file found at {source!r} ({RELATIVE})",
                            "give an existing .json/.jsonl/.csv/.tsv/.parquet file, a directory or a glob")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    builders = {_EXT_BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise ScenarioError(field_name, f"cannot read files with extensions {sorted(exts)} together",
                            "use one of .json, .jsonl, .csv, .tsv, .parquet")
    return files


def _named_sources(cfg: DataConfig) -> list[tuple[str | None, str]]:
    """(source, the setting that names it) of every training and test source."""
    if cfg.sources is None:
        return [(cfg.source, "data.source"), (cfg.test.source, "data.test.source")]
    return [(getattr(s, f), f"data.sources.{name}.{f}") for name, s in cfg.sources.items()
            for f in ("source", "test_source")]


def data_files(cfg: DataConfig) -> list[str]:
    """Every local file the data settings read (none for synthetic or hub data)."""
    files: list[str] = []
    for source, name in _named_sources(cfg):
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


class _DuplicateField(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateField(repr(k))
        out[k] = v
    return out


_CHANGED = "\x00changed"  # not a field: where a field first changed kind (text beside numbers)


def _check_jsonl(path: str, kinds: dict[str, tuple[str, str, int]]) -> None:
    """Every line of a JSON-lines file is one JSON object with each field once, and no field holds a list or a
    mapping in some rows and not in others (``kinds``: each field's kind where first seen, shared by the files read
    together — across files, the reader would turn a list into its JSON text without a word; under :data:`_CHANGED`
    the first other change of kind, which the reader may or may not take)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not JSON ({e.msg} at column {e.colno}); "
                                "every line of a .jsonl file must be one JSON object") from None
            except _DuplicateField as e:
                raise DataError(f"{path} line {n} gives the field {e} twice; give each field once (readers "
                                "disagree on which one wins)") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n} is a JSON {type(row).__name__}, not an object with fields")
            for key, value in row.items():
                kind = _kind(value)
                if kind is None:
                    continue
                seen = kinds.setdefault(key, (kind, path, n))
                if seen[0] != kind:
                    there = f"line {seen[2]}" if seen[1] == path else f"{seen[1]} line {seen[2]}"
                    change = f"{path} line {n}: field {key!r} is {kind}, but {there} has {seen[0]}"
                    if {kind, seen[0]} & {"a list", "a mapping"}:
                        raise DataError(f"{change}; give every row's field the same kind of value")
                    kinds.setdefault(_CHANGED, (change, "", 0))  # text beside numbers: the reader may take it


def _kind(value: Any) -> str | None:
    """A JSON value's kind as a column reader sees it (None for null, which fits any)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    return {str: "text", int: "a number", float: "a number", list: "a list", dict: "a mapping"}[type(value)]


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


def _check_file(path: str, builder: str, cfg: DataConfig, kinds: dict[str, tuple[str, str, int]]) -> None:
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
        _check_jsonl(path, kinds)
    if builder == "csv" and cfg.columns:
        _check_csv_columns(path, cfg.columns, "\t" if path.lower().endswith(".tsv") else ",")


def _root_cause(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _datasets_load() -> Any:
    """``datasets.load_dataset``, in a process where pyarrow may have been kept out (:mod:`fedsim.boot`)."""
    from fedsim.boot import allow_pyarrow

    allow_pyarrow()
    from datasets import load_dataset

    return load_dataset


def _read_files(files: list[str], builder: str, columns: tuple[str, ...] | None) -> Any:
    """``datasets``' reading of local files (one reader: ``builder``; ``columns``: a header-less CSV's), in a
    private, throw-away cache: its own is keyed on path and mtime, and would serve an edited file's old rows (ours,
    keyed on the contents, is the one that persists)."""
    import tempfile

    kwargs: dict[str, Any] = {}
    if any(f.lower().endswith(".tsv") for f in files):
        kwargs["delimiter"] = "\t"
    if columns:
        kwargs["column_names"] = list(columns)
    with tempfile.TemporaryDirectory(prefix="fedsim-read-") as tmp:
        return _datasets_load()(builder, data_files=files, split="train", cache_dir=tmp, **kwargs)


def _load_local(source: str, cfg: DataConfig, field_name: str) -> tuple[list[dict[str, Any]], Part]:
    """The rows of a local source (its files read together, in order) and where they came from."""
    files = _local_files(source, field_name)
    builder = _EXT_BUILDERS[os.path.splitext(files[0])[1].lower()]  # _local_files allows one reader only
    kinds: dict[str, tuple[str, str, int]] = {}
    for f in files:
        _check_file(f, builder, cfg, kinds)
    columns = cfg.columns if builder == "csv" else None
    try:
        rows = _read_files(files, builder, columns).to_list()
    except Exception as e:  # datasets raises many types for malformed files; say what the reader itself said
        root = _root_cause(e)
        if _CHANGED in kinds:  # a field that changed kind (_check_jsonl) is what the reader failed on
            raise DataError(f"{field_name}: {kinds[_CHANGED][0]}; give every row's field the same kind of value") \
                from None
        what = {"json": "JSON", "csv": "a CSV table", "parquet": "Parquet"}[builder]
        raise DataError(f"{field_name}: cannot load {source!r}: it is not {what} that can be read "
                        f"({root.__class__.__name__}: {str(root) or 'no message'})") from None
    return rows, Part(setting=field_name, source=source, count=len(rows), files=tuple(files),
                      count_file=lambda path: count_rows(path, columns))


def _load_hub(name: str, subset: str | None, split: str, field_name: str) -> tuple[list[dict[str, Any]], Part]:
    load_dataset = _datasets_load()

    try:
        ds = load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(
            f"{field_name}: cannot load {name!r} (split {split!r}) from the Hugging Face hub: "
            f"{e.__class__.__name__}: {e}. Check the name and your network, or point {field_name} at a local file."
        ) from None
    rows = ds.to_list()
    return rows, Part(setting=field_name, source=name, count=len(rows), split=split)


def load_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Raw train rows and, when a separate test source or split exists, raw test rows (else None)."""
    train, test, _, _ = load_rows_with_origins(cfg)
    return train, test


Loaded = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, Origins, Origins | None]


def load_rows_with_origins(cfg: DataConfig) -> Loaded:
    """Raw train rows, raw test rows (None without a separate test source or split), and where each row came from
    (:class:`~fedsim.data.origins.Origins`: the file and its row, for errors)."""
    if cfg.sources is not None:
        return _load_sources(cfg)
    if cfg.source == "synthetic":
        s = cfg.synthetic
        train = _synthetic(s.tasks, s.num_train, s.seed)
        test = _synthetic(s.tasks, s.num_test, s.seed + 1_000_003)
        return (train, test, Origins.of([Part("data.source (training)", "synthetic", len(train))]),
                Origins.of([Part("data.source (test)", "synthetic", len(test))]))
    train, part = _read(cfg.source, cfg, "data.source", cfg.subset, cfg.split)
    test, test_part = None, None
    if cfg.test.source is not None:
        test, test_part = _read(cfg.test.source, cfg, "data.test.source", cfg.subset, cfg.test.split or "test")
    elif cfg.test.split is not None:
        if _is_local(cfg.source):
            raise ScenarioError("data.test.split", "a split name only applies to hub data sets",
                                "use data.test.source (a file) or data.test.fraction for local data")
        test, test_part = _load_hub(cfg.source, cfg.subset, cfg.test.split, "data.test.split")
    return train, test, Origins.of([part]), Origins.of([test_part]) if test_part is not None else None


def _read(source: str, cfg: DataConfig, setting: str, subset: str | None, split: str) -> tuple[list[dict[str, Any]],
                                                                                              Part]:
    """A local source's rows, or a hub data set's split, and where they came from."""
    return _load_local(source, cfg, setting) if _is_local(source) else _load_hub(source, subset, split, setting)


def _load_sources(cfg: DataConfig) -> Loaded:
    """``data.sources``: each source's rows (its first ``max_samples``) with its name as their task, one source after
    another; their test rows likewise when every source gives them (the schema allows all or none)."""
    assert cfg.sources is not None and cfg.task_field is not None
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] | None = [] if all(s.has_test() for s in cfg.sources.values()) else None
    parts: list[Part] = []
    test_parts: list[Part] = []
    for name, s in cfg.sources.items():
        one = cfg.model_copy(update={"sources": None, "source": s.source, "subset": s.subset, "split": s.split,
                                     "columns": s.columns if s.columns is not None else cfg.columns})
        where = f"data.sources.{name}"
        rows, part = _read(s.source, one, f"{where}.source", s.subset, s.split)
        rows = rows[: s.max_samples]
        part.count = len(rows)  # the rows kept are the source's first: their numbers are the file's
        parts.append(part)
        train += _as_task(rows, cfg.task_field, name, f"{where}.source")
        if test is not None:
            src = s.test_source if s.test_source is not None else s.source
            if s.test_source is None and _is_local(src):
                raise ScenarioError(f"{where}.test_split", "a split name only applies to hub data sets",
                                    f"give {where}.test_source (a file) instead")
            setting = f"{where}.test_source" if s.test_source is not None else f"{where}.test_split"
            rows, part = _read(src, one, setting, s.subset, s.test_split or "test")
            test_parts.append(part)
            test += _as_task(rows, cfg.task_field, name, setting)
    return train, test, Origins.of(parts), Origins.of(test_parts) if test is not None else None


def _as_task(rows: list[dict[str, Any]], field: str, name: str, where: str) -> list[dict[str, Any]]:
    """``rows`` with ``field`` set to ``name``; a source whose rows hold ``field`` already would lose it: refused."""
    if rows and field in rows[0]:
        raise ScenarioError("data.task_field", f"the rows of {where} already have a field {field!r}, which "
                            "data.sources would overwrite with the source's name",
                            "set data.task_field to a field name the rows do not have")
    return [{**r, field: name} for r in rows]


def count_rows(path: str, columns: tuple[str, ...] | None = None) -> int:
    """The rows a local data file holds, read on its own as a run reads it (``columns``: a header-less CSV's)."""
    return len(_read_files([path], _EXT_BUILDERS[os.path.splitext(path)[1].lower()], columns))


def _synthetic(tasks: tuple[str, ...], n: int, seed: int) -> list[dict[str, Any]]:
    from fedsim.data.synthetic import generate

    return generate(tasks, n, seed)
