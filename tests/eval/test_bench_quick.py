"""`dyncompile bench --quick` end to end on the real workloads (the CI-sized sweep)."""

import json

import pytest

from dyncompile.cli import main
from dyncompile.eval.report import BEGIN


@pytest.mark.slow
def test_bench_quick_writes_results_plots_and_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNCOMPILE_CACHE", str(tmp_path / "cache"))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro kept as is\n")
    rc = main(["bench", "--quick", "--out", str(tmp_path / "out"), "--methods", "gated",
               "--budgets", "1.0,0.5", "--repeats", "2", "--update-md", str(md)])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "bench-quick.json").read_text())
    assert set(data["workloads"]) == {"minilm", "classifier", "lm"}
    for name in data["workloads"]:
        png = tmp_path / "out" / "bench-quick" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    rows = {(r["method"], r["budget"]): r for r in data["workloads"]["minilm"]["results"]}
    dense, full, half = rows[("dense", 1.0)], rows[("gated", 1.0)], rows[("gated", 0.5)]
    assert dense["metrics"] == {"cosine": 1.0, "retrieval_top1": 1.0}
    assert full["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < half["ratios"]["active_channels"] < 0.7
    assert half["metrics"]["cosine"] < full["metrics"]["cosine"]
    assert all(v > 0 for v in dense["speedup"].values())
    lm = {(r["method"], r["budget"]): r for r in data["workloads"]["lm"]["results"]}
    assert lm[("gated", 1.0)]["metrics"]["perplexity"] == pytest.approx(
        lm[("dense", 1.0)]["metrics"]["perplexity"], rel=1e-5)
    assert "unigram_perplexity" in data["workloads"]["lm"]["info"]
    text = md.read_text()
    assert "intro kept as is" in text and BEGIN in text and "### lm" in text
    assert "| gated | 0.5000 |" in capsys.readouterr().out


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="unknown workload"):
        main(["bench", "--workloads", "nope"])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["bench", "--methods", "nope"])
    with pytest.raises(SystemExit, match="allocation"):
        main(["bench", "--methods", "gated:allocation=best"])
    with pytest.raises(SystemExit, match="key=value"):
        main(["bench", "--methods", "gated:cats"])
    with pytest.raises(SystemExit, match="budgets"):
        main(["bench", "--budgets", "0.5,2"])
