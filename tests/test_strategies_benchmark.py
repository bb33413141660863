"""The benchmark driver's pure parts: the test subset, the computed targets, the report files."""

from __future__ import annotations

from collections import Counter

from common.data import Record
from simulations.benchmark_methods import (
    QUICK,
    Result,
    _kept_results,
    _stratified_subset,
    checks,
    plot_banking77,
    write_report,
)


def test_stratified_subset_keeps_class_proportions_and_is_seeded():
    records = [Record({"category": c, "text": f"{c}{i}"}, "x", i)
               for c, n in (("a", 60), ("b", 30), ("c", 10)) for i in range(n)]
    sub = _stratified_subset(records, "category", 20, seed=3)
    assert Counter(r.fields["category"] for r in sub) == {"a": 12, "b": 6, "c": 2}
    assert len({id(r) for r in sub}) == 20
    assert [r.line for r in sub] == [r.line for r in _stratified_subset(records, "category", 20, 3)]
    assert [r.line for r in sub] != [r.line for r in _stratified_subset(records, "category", 20, 4)]


def _results(fed_dp_acc: float) -> list[Result]:
    m = lambda acc: {"accuracy": acc, "macro_f1": acc / 2, "loss": 1.0}  # noqa: E731
    return [
        Result("banking77", "centralized", "pooled data", None, m(0.80), 1.0),
        Result("banking77", "local-only", "each bank alone (mean)", None, m(0.50), 1.0),
        Result("banking77", "federated", "fedavg", 8.0, m(fed_dp_acc), 1.0, 7.9),
        Result("banking77", "federated", "fedavg", None, m(0.78), 1.0),
        Result("medquad", "local-only", "each site alone (mean)", None, {"loss": 2.0}, 1.0),
        Result("medquad", "federated", "fedavg", 8.0, {"loss": 1.9, "perplexity": 6.7}, 1.0),
    ]


def test_targets_are_computed_from_the_measurements():
    ok = "\n".join(checks(_results(0.76)))
    assert "95.0% of centralized non-DP" in ok and "meets the ≥ 90% target" in ok
    assert "beats local-only" in ok and "lower than local-only" in ok
    bad = "\n".join(checks(_results(0.40)))
    assert "50.0% of centralized" in bad and "misses the ≥ 90% target" in bad
    assert "does not beat local-only" in bad


def test_report_and_plot_are_written(tmp_path):
    results = _results(0.7)
    png = plot_banking77(results, tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 1000
    info = {"cpu": "cpu", "cores": 2, "gpu": "none", "python": "3", "torch": "t", "flwr": "f"}
    md, plot = write_report(tmp_path, "b", results, QUICK, 0, 12.0, info, "python -m x", True)
    text = md.read_text()
    assert "`python -m x`" in text and "seed: 0" in text and "2 cores" in text
    assert "| federated | fedavg | 8 | 7.90 | 0.7000 |" in text
    assert (tmp_path / "b.json").exists() and plot is not None and plot.exists()


def test_encoding_rows_are_checked_against_the_fp32_run():
    m = lambda acc: {"accuracy": acc, "macro_f1": acc, "loss": 1.0}  # noqa: E731
    fp32 = Result("banking77", "federated", "fedavg", None, m(0.850), 1.0,
                  extra={"encoding": "fp32", "upload_bytes_per_round": [1000, 1000]})
    int8 = Result("banking77", "federated", "fedavg, int8 upload", None, m(0.846), 1.0,
                  extra={"encoding": "int8", "upload_bytes_per_round": [250, 250]})
    fp16 = Result("banking77", "federated", "fedavg, fp16 upload", None, m(0.830), 1.0,
                  extra={"encoding": "fp16", "upload_bytes_per_round": [500]})
    lines = "\n".join(checks([fp32, int8, fp16]))
    assert "int8 upload (no DP): upload 0.250x fp32's" in lines and "(-0.4 points) — meets" in lines
    assert "fp16 upload (no DP): upload 0.500x" in lines and "(-2.0 points) — misses" in lines


def test_rows_kept_across_only_runs_name_the_run_that_measured_them(tmp_path):
    med = Result("medquad", "federated", "fedavg", None, {"loss": 1.7}, 1.0)
    bank = Result("banking77", "federated", "fedavg", None, {"accuracy": 0.8}, 1.0)
    import json
    from dataclasses import asdict

    path = tmp_path / "b.json"
    path.write_text(json.dumps({"command": "python -m x", "date": "D1", "wall_s": 60.0,
                                "results": [asdict(med), asdict(bank)]}))
    kept, summary = _kept_results(path, "banking77")
    first = "`python -m x` (D1, 1.0 min)"
    assert [r.dataset for r in kept] == ["medquad"] and kept[0].origin == first
    assert summary == f"1 medquad row from {first}"
    # A later --only banking77 run keeps them again: they still come from the first run, also
    # from a report written before rows carried their origin (one kept_from for all).
    for row in (asdict(kept[0]), asdict(med)):
        path.write_text(json.dumps({"command": "python -m x --only banking77", "date": "D2",
                                    "wall_s": 60.0, "kept_from": first,
                                    "results": [row, asdict(bank)]}))
        assert _kept_results(path, "banking77")[0][0].origin == first
    assert _kept_results(path, "all") == ([], "")
    # --dp-only redoes Banking77's DP rows and keeps its rows without DP (from the D2 run).
    dp = Result("banking77", "federated", "fedavg", 8.0, {"accuracy": 0.7}, 1.0)
    path.write_text(json.dumps({"command": "python -m x --only banking77", "date": "D2",
                                "wall_s": 60.0, "kept_from": first,
                                "results": [asdict(kept[0]), asdict(bank), asdict(dp)]}))
    kept, summary = _kept_results(path, "banking77", dp_only=True)
    assert [(r.dataset, r.target_epsilon) for r in kept] == [("medquad", None),
                                                             ("banking77", None)]
    assert kept[1].origin == "`python -m x --only banking77` (D2, 1.0 min)"
    assert summary.startswith(f"1 medquad row from {first}; 1 banking77 row from")
