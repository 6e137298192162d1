"""The sweep, timing, plots and BENCHMARKS.md regeneration, on a synthetic workload."""

import json

import pytest
import torch

from dyncompile.eval import report
from dyncompile.eval.sweep import parse_method, run_sweep, save
from dyncompile.eval.timing import paired_speedup, peak_rss_during, time_interleaved
from dyncompile.eval.workload import Workload
from dyncompile.testing.zoo import PlainMLP


class MLPWorkload(Workload):
    name = "mlp"
    metrics = ("cosine", "mse")
    higher_is_better = {"cosine": True, "mse": False}

    def build(self):
        torch.manual_seed(0)
        return PlainMLP()

    def _batches(self, n):
        g = torch.Generator().manual_seed(self.seed + n)
        return [(torch.randn(2, 5, 32, generator=g),) for _ in range(n)]

    def calibration(self):
        return self._batches(2)

    def evaluate(self, model):
        outs = [model(*b) for b in self._batches(3)]
        refs = [self.model(*b) for b in self._batches(3)]
        cos = torch.cat([torch.cosine_similarity(o, r, dim=-1).flatten()
                         for o, r in zip(outs, refs)]).mean()
        mse = sum(float(((o - r) ** 2).mean()) for o, r in zip(outs, refs)) / len(outs)
        return {"cosine": float(cos), "mse": mse}

    def timing_inputs(self):
        return {"1x5": (torch.randn(1, 5, 32),)}


def test_time_interleaved_rotates_and_returns_medians():
    calls = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         repeats=4, warmup=1)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_peak_rss_sees_what_a_call_held_at_its_peak():
    """peak_rss_during: a call that holds 64 MiB at once peaks at least that far above
    where it started, and one that holds nothing does not (Linux; None elsewhere)."""
    import sys

    def hold():
        t = torch.ones(16 << 20)  # 64 MiB, touched
        return float(t.sum())

    big, small = peak_rss_during(hold), peak_rss_during(lambda: torch.ones(8).sum())
    if not sys.platform.startswith("linux"):
        assert big is None and small is None
        return
    assert big is not None and small is not None
    assert big >= 60 << 20 and small < 16 << 20


def test_paired_speedup_pairs_calls_of_the_same_round():
    # The machine halves its speed after two rounds: each round, b takes half a's time.
    samples = {"a": [1.0, 1.0, 2.0, 2.0, 2.0], "b": [0.5, 0.5, 1.0, 1.0, 1.0]}
    assert paired_speedup(samples, "a", "b") == 2.0
    # Three of five rounds show b twice as fast: the pairs say 2.0, while the medians
    # (1.0 and 1.0) mix slow rounds of a with fast rounds of b.
    samples = {"a": [1.0, 1.0, 1.0, 2.0, 2.0], "b": [0.5, 1.0, 1.0, 1.0, 1.0]}
    assert paired_speedup(samples, "a", "b") == 2.0
    assert paired_speedup(samples, "b", "a") == 0.5


def test_sweep_dense_reproduces_itself_and_reports(tmp_path):
    results = run_sweep([MLPWorkload()], methods=[], budgets=(1.0, 0.5), repeats=3,
                        progress=False)
    (row,) = results["workloads"]["mlp"]["results"]
    assert row["method"] == "dense" and row["metrics"] == {"cosine": pytest.approx(1.0),
                                                           "mse": 0.0}
    assert row["spent"] == 1.0
    assert row["speedup"]["1x5"] > 0 and row["dense_latency_ms"]["1x5"] > 0
    path = save(results, tmp_path / "bench.json")
    assert json.loads(path.read_text())["meta"]["threads"] == 2
    (png,) = report.plot(results, tmp_path / "plots")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written intro\n")
    report.update_markdown(md, report.tables(results, image_dir="plots"))
    report.update_markdown(md, report.tables(results, image_dir="plots"))  # idempotent
    text = md.read_text()
    assert text.count(report.BEGIN) == 1 and "hand-written intro" in text
    assert "| dense | 1.0000 | 1.0000 |" in text and "![mlp](plots/mlp.png)" in text


def test_sweep_rejects_a_dense_model_that_does_not_reproduce():
    class Noisy(MLPWorkload):
        def evaluate(self, model):
            return {"cosine": float(torch.rand(())), "mse": 0.0}

    with pytest.raises(RuntimeError, match="does not reproduce"):
        run_sweep([Noisy()], methods=[], timing=False, progress=False)


def test_planned_method_is_every_form_under_one_budget(tmp_path):
    results = run_sweep([MLPWorkload()], methods=["planned"], budgets=(1.0, 0.5),
                        timing=False, progress=False)
    rows = {(r["method"], r["budget"]): r for r in results["workloads"]["mlp"]["results"]}
    dense = rows[("dense", 1.0)]
    assert rows[("planned", 1.0)]["metrics"]["cosine"] == pytest.approx(
        dense["metrics"]["cosine"], abs=1e-5)
    assert rows[("planned", 1.0)]["spent"] == pytest.approx(1.0)
    assert rows[("planned", 0.5)]["spent"] < 0.95  # the plan spent less at the lower budget
    (png,) = report.plot(results, tmp_path / "plots")
    assert png.stat().st_size > 1000


def test_parse_planned_method_options():
    assert parse_method("planned") == ("planned", {})
    assert parse_method("planned:unit=time+forms=expert/gated") == (
        "planned", {"unit": "time", "forms": "expert/gated"})
    with pytest.raises(ValueError, match="planned takes"):
        parse_method("planned:glu=cats")


def test_named_sections_regenerate_side_by_side(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    report.update_markdown(md, "first table")
    report.update_markdown(md, "plan table", section="plan")
    report.update_markdown(md, "plan table, again", section="plan")
    text = md.read_text()
    begin, end = report.markers("plan")
    assert text.count(begin) == 1 and text.count(end) == 1
    assert "first table" in text and "plan table, again" in text
    assert "plan table\n" not in text and text.count(report.BEGIN) == 1
