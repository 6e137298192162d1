"""Kernel tests on both builds of a C++ kernel from one source: the native one
(``-march=native``) and the portable one (AVX2 on x86-64, plain NEON on ARM)."""

import functools
import os
import subprocess
import sys

import pytest

BUILDS = ["native", "portable"]
_VARIANTS: dict[str, object] = {}


def _clear_caches(module):
    for v in vars(module).values():
        if isinstance(v, functools._lru_cache_wrapper):
            v.cache_clear()


def use_build(module, which, monkeypatch):
    """Point ``module`` (an op's cpu.py) at its ``which`` build for this test; returns the
    extension. The module's caches are cleared now and when the test ends."""
    if which == "native":
        return module._EXT
    ext = _VARIANTS.get(module.__name__)
    if ext is None:
        ext = _VARIANTS[module.__name__] = module._EXT.portable()
    if ext is None:  # neither x86-64 nor ARM: the native build is the only one
        pytest.skip("no portable build defined for this architecture")
    assert ext.load() is not None, f"the portable build of {module._EXT.name} failed"
    monkeypatch.setattr(module, "_EXT", ext)
    _clear_caches(module)
    return ext


@pytest.fixture
def kernel_build(request, monkeypatch):
    """``kernel_build(module, which)``: ``use_build`` with the caches cleared again after
    the test."""
    touched = []

    def use(module, which):
        touched.append(module)
        return use_build(module, which, monkeypatch)

    yield use
    monkeypatch.undo()
    for module in touched:
        _clear_caches(module)


def assert_runs_interpreted(code: str) -> None:
    """Run ``code`` in a fresh interpreter under ``TRITON_INTERPRET=1`` (Triton kernels
    on the CPU); it must print "ok" last."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]
