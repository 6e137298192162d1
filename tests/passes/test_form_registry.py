"""A new form plugs in by registering a Pass subclass; no other file changes."""

import subprocess
import sys

import pytest
import torch

import dyncompile
from dyncompile.passes.base import Pass
from dyncompile.passes.rewrite import FORMS, register_form
from dyncompile.testing.zoo import ZOO


@pytest.fixture
def scale_form():
    @register_form
    class HalveFFNOutputs(Pass):
        """Test-only form: multiplies every detected FFN output by 0.5."""

        name = "test_halve_ffn"

        def run(self, gm, ctx):
            for ffn in ctx.blocks.ffn:
                out = ffn.output
                with gm.graph.inserting_after(out):
                    half = gm.graph.call_function(torch.mul, (out, 0.5))
                out.replace_all_uses_with(half, delete_user_cb=lambda u, h=half: u is not h)
            ctx.log.append(f"halved {len(ctx.blocks.ffn)} ffn outputs")

    yield HalveFFNOutputs
    FORMS.pop("test_halve_ffn")


def test_registered_form_is_selectable_and_rewrites(scale_form):
    assert "test_halve_ffn" in dyncompile.known_methods()
    entry = ZOO["mlp"]
    model = entry.build()
    x = entry.inputs(1, 3)
    opt = dyncompile.optimize(model, methods=["test_halve_ffn"], compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), 0.5 * model(*x))


def test_forms_can_import_pass_without_cycles():
    code = ("from dyncompile.passes.base import Pass\n"
            "from dyncompile.passes.rewrite import register_form\n"
            "import dyncompile.backend\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
