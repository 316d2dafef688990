"""Built-in, procedurally generated multi-task instruction data, so that the quickstart and the tests need no download.

Each task maps a short prompt to a short answer (a few bytes), so that a tiny byte-level model can learn it with LoRA
within a few federated rounds. Every row has ``instruction``, ``output`` and ``task`` fields.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedsim import registry

_LETTERS = "abcdefgh"


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(_LETTERS), size=n))


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 5, size=2))
    return f"add {a} {b}", str(a + b)


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 3)
    return f"reverse {w}", w[::-1]


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    digits = [str(int(x)) for x in rng.integers(0, 10, size=3)]
    return f"sort {''.join(digits)}", "".join(sorted(digits))


def _upper(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 3)
    return f"upper {w}", w.upper()


def _count(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 5)
    c = w[int(rng.integers(0, 5))]
    return f"count {c} in {w}", str(w.count(c))


def _first(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 4)
    return f"first {w}", w[0]


def _last(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 4)
    return f"last {w}", w[-1]


def _max(rng: np.random.Generator) -> tuple[str, str]:
    digits = [str(int(x)) for x in rng.integers(0, 10, size=3)]
    return f"max {' '.join(digits)}", max(digits)


TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
    "first": _first,
    "last": _last,
    "max": _max,
}
for _name, _task in TASKS.items():  # a task of your own: registry.register("synthetic_task", "name", fn(rng))
    registry.register("synthetic_task", _name, _task)


def generate(tasks: tuple[str, ...] | list[str], num_rows: int, seed: int) -> list[dict[str, str]]:
    """``num_rows`` rows cycling over ``tasks`` (balanced), each drawn from a generator seeded by ``seed``.

    Returns:
        A list of ``{"instruction", "output", "task"}`` dicts.
    """
    rng = np.random.default_rng(seed)
    known = registry.entries("synthetic_task")
    rows = []
    for i in range(num_rows):
        task = tasks[i % len(tasks)]
        prompt, answer = known[task](rng)
        rows.append({"instruction": prompt, "output": answer, "task": task})
    return rows
