"""Every numerical tolerance in the tests is named in tests/tolerances.py, where it says where it comes from (#44
point 3): a bare number as ``atol=``/``rtol=``/``rel=``/``abs=`` or as the right side of ``<``/``<=`` fails here."""

from __future__ import annotations

import re
from pathlib import Path

import tolerances

TESTS = Path(__file__).resolve().parents[1]
NUMBER = r"\d[\d_]*(?:\.\d*)?(?:e-?\d+)?"
BARE = re.compile(rf"\b(?:atol|rtol|rel|abs)\s*=\s*(?P<kw>{NUMBER})\b|<=?\s*(?P<cmp>{NUMBER}e-\d+)\b")


def _bare(text: str) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        for m in BARE.finditer(line.split("#")[0]):
            value = m.group("kw") or m.group("cmp")
            if float(value) != 0.0:  # an exact comparison needs no reason
                out.append((i, line.strip()))
    return out


def test_no_test_writes_a_bare_tolerance():
    found = [f"{p.relative_to(TESTS)}:{i}: {line}" for p in sorted(TESTS.rglob("*.py"))
             if p.name not in ("tolerances.py", "test_tolerances.py") for i, line in _bare(p.read_text())]
    assert not found, "name the tolerance in tests/tolerances.py (and say where it comes from):\n" + "\n".join(found)


def test_the_scan_finds_what_it_must():
    assert _bare("torch.testing.assert_close(a, b, atol=1e-5, rtol=0)") == [(1, "torch.testing.assert_close(a, b, "
                                                                               "atol=1e-5, rtol=0)")]
    assert len(_bare("x == pytest.approx(y, rel=0.05)\nassert err <= 1e-6 * scale\nassert d < 2.5e-3")) == 3
    assert not _bare("assert_close(a, b, atol=F32_ALGEBRA, rtol=0)\nx = max(n, 1e-12)\nassert gap > 1e-3")


def test_the_a_priori_bounds_are_higham_gammas():
    assert tolerances.gamma(1) == tolerances.U32 / (1 - tolerances.U32)
    assert 7.6e-6 < tolerances.F32_ALGEBRA < 7.7e-6 and tolerances.F64 < 1.2e-12
    assert tolerances.F32_ELEMENTWISE < tolerances.F32_ALGEBRA < tolerances.F32_NETWORK < tolerances.HALF_TRAINING
