"""The README's examples run as written, and the command line does what it says."""
import os
import pathlib
import re
import subprocess
import sys

import normkernels as nk
from normkernels.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_usage_example_runs(capsys):
    blocks = python_blocks()
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "'torch': True" in capsys.readouterr().out


def test_ddp_example_runs_under_gloo_on_two_processes(tmp_path):
    """#12.8: the DDP example, exactly as written, under torchrun with 2 CPU processes (gloo)."""
    [block] = [b for b in python_blocks() if b.startswith("# train.py")]
    script = tmp_path / "train.py"
    script.write_text(block)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "trained 2 processes: loss" in run.stdout


def test_deploy_example_runs_and_its_files_load_without_normkernels(tmp_path, monkeypatch):
    """The Deploy section's example as written; then model.pt2 runs in a process that never
    imports normkernels, and model.onnx in onnxruntime, at another batch size."""
    [block] = [b for b in python_blocks() if "torch.export.save" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    check = (
        "import sys, torch, onnxruntime as ort\n"
        "x = torch.randn(3, 3, 64, 64)\n"
        "y = torch.export.load('model.pt2').module()(x)\n"
        "s = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider'])\n"
        "z = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]\n"
        "assert 'normkernels' not in sys.modules and y.shape == z.shape\n"
        "assert (y - torch.from_numpy(z)).abs().max() < 1e-4\n"
        "print('deployed ok')\n")
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and "deployed ok" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


# ---------------------------------------------------------------- command line (#12.10)

def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "study" in out and "--version" in out and "bench" not in out  # benchmarks/bench.py


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"normkernels {nk.__version__}"


def test_unknown_command_and_no_command(capsys):
    assert main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    assert main([]) == 2 and "study" in capsys.readouterr().err


def test_study_without_its_extras_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ModuleNotFoundError
    assert main(["study", "--quick", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install 'normkernels[study]'" in err
