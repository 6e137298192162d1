import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture_graphs(model, inputs, fn=None):
    """Trace model with dynamo; call fn(gm, example_inputs) on each graph; return results."""
    from dyncompile.module import call_batch

    out = []

    def backend(gm, example_inputs):
        out.append(fn(gm, example_inputs) if fn else gm)
        return gm.forward

    with torch.no_grad():
        call_batch(torch.compile(model, backend=backend), inputs)
    return out


@pytest.fixture
def dyncompile_log():
    """Messages logged on the "dyncompile" logger during the test (pytest's logging
    plugin is off, so caplog is not available)."""
    import logging

    messages: list[str] = []

    class _Records(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _Records()
    logger = logging.getLogger("dyncompile")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
