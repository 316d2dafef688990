"""What tokenizing the data did, in words: the length in force, and rows truncated or dropped per split.

Truncation above :data:`WARN_FRACTION` of a split's rows — or any response cut, or any row dropped — is a warning:
``fedsim validate`` prints it, a run prints it once and keeps it in its summary's notes.
"""

from __future__ import annotations

from typing import Any

from fedsim.data.tokenize import AUTO_PERCENTILE

WARN_FRACTION = 0.01  # share of a split's rows whose prompt lost its start before it is worth a warning


def length_line(stats: dict[str, Any]) -> str:
    """``max_seq_len 64`` or ``max_seq_len auto → 96``, with the longest training row."""
    n = stats.get("max_seq_len")
    if stats.get("auto"):
        capped = ", the model's maximum" if n == stats.get("model_max") else ""
        how = f"auto → {n} (the {AUTO_PERCENTILE}th percentile of the training rows' lengths{capped})"
    else:
        how = str(n)
    return f"max_seq_len {how}; the longest training row has {stats.get('train', {}).get('longest', 0)} tokens"


def warnings(stats: dict[str, Any]) -> list[str]:
    """What is worth a warning: splits with many truncated rows, cut responses, dropped rows; the format's advice."""
    out = []
    n = stats.get("max_seq_len")
    for split in ("train", "test"):
        st = stats.get(split)
        if not st or not st.get("rows"):
            continue
        rows, name = st["rows"], "training" if split == "train" else "test"
        parts = []
        if st["truncated"] and st["truncated"] / rows > WARN_FRACTION:
            parts.append(f"{st['truncated']} lost the start of their prompt")
        if st["response_cut"]:
            parts.append(f"{st['response_cut']} lost the end of their response (it alone is longer)")
        if st["dropped"]:
            parts.append(f"{st['dropped']} were dropped (data.too_long: drop)")
        if parts:
            share = (st["truncated"] + st["response_cut"] + st["dropped"]) / rows
            cap = stats.get("model_max")
            if stats.get("auto") and n == cap:
                fix = (f"the model takes at most {n} tokens: shorten the rows, or leave them out with "
                       "data.too_long: drop")
            elif stats.get("auto"):  # auto fits most training rows, not all (see data.max_seq_len)
                whole = min(8 * -(-st["longest"] // 8), cap) if cap else 8 * -(-st["longest"] // 8)
                fix = (f"max_seq_len: auto chose {n} (the length most training rows fit in); set data.max_seq_len: "
                       f"{whole} to keep {'every row' if not cap or st['longest'] <= cap else 'them'} whole"
                       f"{'' if not cap or st['longest'] <= cap else f' up to the model maximum {cap}'}")
            else:
                fix = "raise data.max_seq_len or set it to auto"
            out.append(f"data: {share:.1%} of the {rows} {name} rows are longer than max_seq_len {n}: "
                       f"{'; '.join(parts)}. The longest has {st['longest']} tokens: {fix}")
    return out + list(stats.get("notes", []))
