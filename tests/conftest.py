import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_index_fix():
    """Triton 3.6's interpreter (the GPU machine's triton, when run here without a GPU) holds a
    scalar as a 1-element 1-d array and turns it into a loop bound with int(array), which numpy >=
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel
    with a `range` over a runtime bound fails. Newer triton (3.9) squeezes first; do the same where
    the installed interpreter does not. Interpreter only: compiled kernels never go through it."""
    import importlib.util
    import inspect
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(patch_tensor):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()

# Op tests run on every device present: CPU always, CUDA when there is a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (run on a GPU machine: pytest -m cuda)")
    config.addinivalue_line("markers", "gpu_compile: compiles kernels for sm_90 without a GPU (pytest -m gpu_compile)")


def pytest_collection_modifyitems(config, items):
    """GPU-only tests (marked cuda) are deselected where there is no GPU, as the device fixture
    has no [cuda] rows there: a run without a GPU skips nothing."""
    if torch.cuda.is_available():
        return
    gpu_only = [item for item in items if "cuda" in item.keywords]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if "cuda" not in item.keywords]


_TERMINAL_SECTIONS: list = []


@pytest.fixture(scope="session")
def terminal_section():
    """add(title, text): print text under a title at the end of the pytest run (e.g. the
    registers and spills per Triton kernel of tests/test_triton_compile.py)."""
    return lambda title, text: _TERMINAL_SECTIONS.append((title, text))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, text in _TERMINAL_SECTIONS:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)
