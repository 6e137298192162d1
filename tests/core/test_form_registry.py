"""A new form plugs in from files alone: a Pass subclass registered with register_form,
found by discovery (a package under dyncompile/forms, or a ``dyncompile.forms`` entry
point); no existing file changes."""

import subprocess
import sys
import textwrap

import pytest
import torch

import dyncompile
from dyncompile.core.registry import forms, register_form, unregister_form
from dyncompile.passes.base import Pass
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
    unregister_form("test_halve_ffn")


def test_registered_form_is_selectable_and_rewrites(scale_form):
    assert "test_halve_ffn" in dyncompile.known_methods()
    entry = ZOO["mlp"]
    model = entry.build()
    x = entry.inputs(1, 3)
    opt = dyncompile.optimize(model, methods=["test_halve_ffn"], compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), 0.5 * model(*x))


def test_builtin_forms_are_discovered_from_their_packages():
    found = forms()
    assert {"gated", "expert", "early_exit"} <= set(found)
    for name, cls in found.items():
        if name in ("gated", "expert", "early_exit"):
            assert cls.__module__.startswith(f"dyncompile.forms.{name}.")


def test_a_form_from_files_alone_through_its_entry_point(tmp_path):
    """A form in its own package, registered the documented way (a ``dyncompile.forms``
    entry point of an installed distribution), with typed options, runs under optimize()."""
    pkg = tmp_path / "toy_form"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        import torch

        from dyncompile.core.options import choice
        from dyncompile.core.registry import register_form
        from dyncompile.passes.base import Pass


        @dataclass(frozen=True)
        class ToyOptions:
            factor: str = choice("half", "quarter")


        @register_form
        class ToyForm(Pass):
            """Scales every detected FFN output."""

            name = "toy_scale"
            Options = ToyOptions

            def run(self, gm, ctx):
                opts = ctx.config.options_for(self.name)
                k = 0.5 if opts.factor == "half" else 0.25
                for ffn in ctx.blocks.ffn:
                    out = ffn.output
                    with gm.graph.inserting_after(out):
                        y = gm.graph.call_function(torch.mul, (out, k))
                    out.replace_all_uses_with(y, delete_user_cb=lambda u, y=y: u is not y)
                gm.meta["toy_rewrote"] = len(ctx.blocks.ffn)
    '''))
    dist = tmp_path / "toy_form-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-form\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dyncompile.forms]\ntoy_scale = toy_form\n")
    code = textwrap.dedent('''
        import torch
        import dyncompile
        from dyncompile.testing.zoo import ZOO

        assert "toy_scale" in dyncompile.known_methods(), dyncompile.known_methods()
        entry = ZOO["mlp"]
        model = entry.build()
        x = entry.inputs(1, 3)
        with torch.no_grad():
            dense = model(*x)
            for factor, k in (("half", 0.5), ("quarter", 0.25)):
                opt = dyncompile.optimize(model, methods=["toy_scale"], compiler="eager",
                                          form_options={"toy_scale": {"factor": factor}})
                torch.testing.assert_close(opt(*x), k * dense)
        try:
            dyncompile.optimize(model, methods=["toy_scale"],
                                form_options={"toy_scale": {"factor": "third"}})
        except ValueError as e:
            assert "allowed" in str(e), e
        else:
            raise AssertionError("a bad option value was accepted")
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**_env(), "PYTHONPATH": str(tmp_path)})
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bad_option_names_and_values_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown gated option 'nope'.*allocation"):
        dyncompile.DynConfig(methods=["gated"], form_options={"gated": {"nope": 1}})
    with pytest.raises(ValueError, match=r"glu='x'; allowed: \('teal', 'cats'\)"):
        dyncompile.DynConfig(methods=["gated"], form_options={"gated": {"glu": "x"}})
    cfg = dyncompile.DynConfig(methods=["gated"], form_options={"gated": {"glu": "cats"}})
    opts = cfg.options_for("gated")
    assert (opts.glu, opts.allocation, opts.layout) == ("cats", "uniform", "input_major")


def test_forms_can_import_pass_without_cycles():
    code = ("from dyncompile.passes.base import Pass\n"
            "from dyncompile.core.registry import register_form\n"
            "import dyncompile.backend\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def _env():
    import os

    return dict(os.environ)
