"""The adaptive forms, one package each: ``gated``, ``expert``, ``early_exit``.

A form package owns everything about its form: the graph rewrite (a
:class:`~dyncompile.passes.base.Pass` registered with
:func:`~dyncompile.core.registry.register_form`), its typed options, its
call-side runtime (thresholds, routers, the exit runner), its calibration fit
and the thin op glue that reads runtime state. Forms are discovered
(:func:`dyncompile.core.registry.forms`): adding one is adding a folder here, or
a ``dyncompile.forms`` entry point in another package. A form never imports
another form.
"""
