"""The column layouts of the SBN ops: Python's (normkernels/ops/sbn_layout.py, used by the oracle,
the Triton code and the fakes) are the C++ header's (csrc/sbn_finalize.h: RowCol, SavedCol,
GradCol, FftNorm), and the ops' outputs have those widths."""
import pathlib
import re

import torch

import normkernels  # noqa: F401  (the ops)
from normkernels.ops import sbn_layout as layout

HEADER = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "sbn_finalize.h"


def header_enum(struct: str) -> tuple:
    """The enumerators of `struct X { enum : int { ... }; };` in order, Width excluded."""
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    body = re.search(r"struct " + struct + r"\s*{\s*enum\s*:\s*int\s*{([^}]*)}", text).group(1)
    names = tuple(n.strip() for n in body.split(",") if n.strip())
    assert names[-1] == "Width", names
    return names[:-1]


def test_columns_are_the_headers():
    assert layout.ROWS == header_enum("RowCol")
    assert layout.SAVED == header_enum("SavedCol")
    assert layout.GSUMS == header_enum("GradCol")
    assert layout.SAVED[:len(layout.APPLY)] == layout.APPLY
    body = re.search(r"enum class FftNorm : int {([^}]*)}", HEADER.read_text()).group(1)
    assert tuple(n.split("=")[0].strip().lower() for n in body.split(",")) == layout.FFT_NORMS


def test_ops_outputs_have_those_widths():
    ops = torch.ops.normkernels
    x = torch.randn(2, 3, 4, 5)
    assert ops.sbn_stats(x).shape == (3, len(layout.ROWS))
    for bn in (False, True):
        saved = ops.sbn_forward(x, bn, None, None, None, None, None, None, None, None, 1e-5, 1e-5, "backward",
                                "identity", 0.0)[5]
        assert saved.shape == (3, len(layout.SAVED))
        assert ops.sbn_grad_stats(x, x, saved, "identity", 0.0).shape == (3, len(layout.GSUMS))
