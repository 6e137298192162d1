"""Evaluation harness: workloads, metrics, timing, sweeps and reports.

Every adaptive form is judged the same way: quality against the dense model
on held-out data, the compute fraction the runtime reports, and latency as a
ratio against the dense model compiled with the default backend in the same
run. ``dyncompile bench`` runs the sweep; ``--quick`` is small enough for CI.
"""
