"""benchmarks/interleaved.py runs and times every layer it names (a smoke test: no timing is
asserted; measurements belong to the benchmarks)."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved.py"


def test_interleaved_times_every_layer(capsys):
    spec = importlib.util.spec_from_file_location("interleaved", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ms = mod.medians_ms((2, 8, 4, 4), rounds=1)
    names = {"BN", "BN,ReLU"} | {n + s for n in mod.LAYERS for s in ("", "+ReLU", ",ReLU")}
    assert set(ms) == names and all(v > 0 for v in ms.values())
    assert type(mod.layers(8)["SBN+ReLU"]).__name__ == "SpectralBatchNormAct2d"
    mod.main(["2,8,4,4"])
    out = capsys.readouterr().out
    assert "2x8x4x4" in out and all(name in out for name in mod.LAYERS)
