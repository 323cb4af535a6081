"""Run a script under each build of the CPU kernels (csrc/cpu/isa.h: the baseline ISA build and
the AVX2 build, chosen at run time; NORMKERNELS_CPU_ISA=baseline forces the baseline), for the
tests that check the two builds agree bit for bit."""
import os
import pathlib
import subprocess
import sys

import torch

import normkernels

ROOT = pathlib.Path(normkernels.__file__).resolve().parents[1]  # the normkernels under test


def outputs_per_isa(script: str, tmp_path) -> list[list]:
    """[baseline outputs, native outputs]: what `script` torch.save()s to sys.argv[1], run once
    per build in a fresh single-threaded process."""
    path = tmp_path / "isa.py"
    path.write_text(script)
    results = []
    for isa in ("baseline", "native"):
        env = dict(os.environ, NORMKERNELS_CPU_ISA=isa, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, str(path), str(out)], check=True, env=env)
        results.append(torch.load(out))
    assert len(results[0]) == len(results[1]) > 0
    return results
