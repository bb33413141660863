"""The benchmark driver's pure parts: the test subset, the computed targets, the report files."""

from __future__ import annotations

from collections import Counter

from benchmarks.benchmark_methods import (
    NOISE_FREE,
    QUICK,
    Result,
    _kept_results,
    _key,
    _merged,
    _merged_tuning,
    _origins,
    _stratified_subset,
    checks,
    plot_banking77,
    write_report,
)
from fedtune.common.data import Record


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


def test_targets_hold_to_the_better_centralized_run_without_dp(tmp_path):
    m = lambda acc: {"accuracy": acc, "macro_f1": acc, "loss": 1.0}  # noqa: E731
    rows = [*_results(0.76),
            Result("banking77", "centralized", NOISE_FREE, None, m(0.95), 1.0)]
    lines = "\n".join(checks(rows))
    assert "= 80.0% of centralized non-DP (0.9500, the DP recipe with noise 0)" in lines
    assert "misses the ≥ 90% target" in lines
    png = plot_banking77(rows, tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 1000


def test_report_and_plot_are_written(tmp_path):
    results = _results(0.7)
    png = plot_banking77(results, tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 1000
    info = {"cpu": "cpu", "cores": 2, "gpu": "none", "python": "3", "torch": "t", "flwr": "f"}
    md, plot = write_report(tmp_path, "b", results, QUICK, 0, 12.0, info, "python -m x", True)
    text = md.read_text()
    assert "`python -m x`" in text and "seed: 0" in text and "2 cores" in text
    assert "| federated | fedavg | 8 | 7.90 | - | 0.7000 |" in text
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
    kept, _ = _kept_results(path, "banking77")
    first = "`python -m x` (D1, 1.0 min)"
    assert [r.dataset for r in kept] == ["medquad"] and kept[0].origin == first
    assert _origins(_merged(kept, [bank])) == f"1 medquad row from {first}"
    # A later --only banking77 run keeps them again: they still come from the first run, also
    # from a report written before rows carried their origin (one kept_from for all).
    legacy = {k: v for k, v in asdict(med).items() if k != "origin"}
    for row in (asdict(kept[0]), legacy):
        path.write_text(json.dumps({"command": "python -m x --only banking77", "date": "D2",
                                    "wall_s": 60.0, "kept_from": first,
                                    "results": [row, asdict(bank)]}))
        assert _kept_results(path, "banking77")[0][0].origin == first
    assert _kept_results(path, "all") == ([], [])


def test_dp_only_replaces_the_dp_rows_it_measures_and_keeps_the_rest_with_their_recipe(
        tmp_path):
    import json
    from dataclasses import asdict

    m = lambda acc: {"accuracy": acc, "macro_f1": acc, "loss": 1.0}  # noqa: E731
    med = Result("medquad", "federated", "fedavg", None, {"loss": 1.7}, 1.0, origin="`D0`")
    bank = Result("banking77", "federated", "fedavg", None, m(0.8), 1.0)
    eps1 = Result("banking77", "federated", "fedavg", 1.0, m(0.6), 1.0)
    eps8 = Result("banking77", "federated", "fedavg", 8.0, m(0.7), 1.0)
    path = tmp_path / "b.json"
    path.write_text(json.dumps({
        "command": "python -m x --dp-only", "date": "D2", "wall_s": 60.0, "kept_from": "",
        "scale": {"dp_optimizer": "sgd", "dp_lr": 0.05, "dp_batch_size": 256},
        "dp_step_sizes": [{"setting": "federated", "epsilon": e, "head_lr": lr,
                           "validation_accuracy": {lr: 0.5}} for e, lr in ((1.0, 0.5), (8.0, 5.0))],
        "results": [asdict(r) for r in (med, bank, eps1, eps8)]}))
    kept, tuning = _kept_results(path, "banking77", dp_only=True)
    assert [_key(r) for r in kept] == [_key(r) for r in (med, bank, eps1, eps8)]
    # rows of a report from before rows carried their DP recipe get that report's
    assert kept[2].extra["dp_recipe"] == {"optimizer": "sgd", "lr": 0.05, "batch_size": 256,
                                          "head_lr": 0.5}
    assert "dp_recipe" not in kept[1].extra and kept[3].extra["dp_recipe"]["head_lr"] == 5.0
    assert [t["batch_size"] for t in tuning] == [256, 256]
    # This run measured epsilon 8 again (batch 512): it replaces that row in place, the rest stay.
    new8 = Result("banking77", "federated", "fedavg", 8.0, m(0.79), 1.0, extra={
        "dp_recipe": {"optimizer": "sgd", "lr": 0.05, "batch_size": 512, "head_lr": 10.0}})
    rows = _merged(kept, [new8])
    assert [r.metrics.get("accuracy") for r in rows] == [None, 0.8, 0.6, 0.79]
    assert rows[3].origin == "" and rows[2].origin.startswith("`python -m x --dp-only` (D2")
    assert _origins(rows).startswith("1 medquad row from `D0`; 2 banking77 rows from")
    new_tuning = [{"setting": "federated", "epsilon": 8.0, "head_lr": 10.0, "batch_size": 512,
                   "validation_accuracy": {10.0: 0.8}}]
    assert [(t["epsilon"], t["batch_size"]) for t in _merged_tuning(tuning, new_tuning, rows)] == [
        (1.0, 256), (8.0, 512)]
    info = {"cpu": "cpu", "cores": 2, "gpu": "none", "python": "3", "torch": "t", "flwr": "f"}
    md, _ = write_report(tmp_path, "r", rows, QUICK, 0, 1.0, info, "python -m x", False,
                         _origins(rows), _merged_tuning(tuning, new_tuning, rows))
    text = md.read_text()
    assert "| federated | fedavg | 8 | - | 512, 10 | 0.7900 |" in text
    assert "| federated | fedavg | 1 | - | 256, 0.5 | 0.6000 |" in text
    assert "| federated | 8 | 512 | 10 |" in text and "| federated | 1 | 256 | 0.5 |" in text


def test_fedavgm_dp_recipe_keeps_the_steps_per_bank_and_scales_the_step_sizes(tmp_path):
    import pytest
    import typer
    from rich.console import Console
    from rich.progress import Progress

    from benchmarks.benchmark_methods import FULL, MOMENTUM, Bench, main

    bench = Bench(FULL, tmp_path, 0, Console(), Progress(), 1)
    bench.head_lr[("federated, fedavgm", 8.0)] = 1.0
    bench.head_lr[("federated", 8.0)] = 10.0
    r = bench.dp_recipe("federated", 8.0, MOMENTUM)
    assert r["rounds"] * r["local_steps"] == FULL.rounds * FULL.local_steps
    assert r["lr"] == round(FULL.dp_lr * (1 - FULL.dp_server_momentum), 12)
    assert r["head_lr"] == 1.0 and bench.dp_recipe("federated", 8.0)["head_lr"] == 10.0
    overrides = bench.dp_train("federated", 8.0, MOMENTUM)
    assert f"federation.rounds={r['rounds']}" in overrides
    assert f"federation.server_momentum={FULL.dp_server_momentum}" in overrides
    assert not any(o.startswith("federation.") for o in bench.dp_train("federated", 8.0))
    # a schedule that would change the steps per bank is refused, naming the field
    with pytest.raises(typer.BadParameter, match="dp_momentum_rounds=5"):
        main(quick=False, datasets=tmp_path, out=tmp_path, work=tmp_path, seed=0, only="all",
             dp_only=False, scale_set=["dp_momentum_rounds=5"])


def test_dp_accountant_reaches_the_runs_their_recipes_and_the_report(tmp_path):
    import pytest
    import typer
    from rich.console import Console
    from rich.progress import Progress

    from benchmarks.benchmark_methods import FULL, Bench, _override, main

    prv = _override(FULL, ["dp_accountant=prv", "dp_batch_size=1024"])
    assert (prv.dp_accountant, prv.dp_batch_size, FULL.dp_accountant) == ("prv", 1024, "rdp")
    bench = Bench(prv, tmp_path, 0, Console(), Progress(), 1)
    assert bench.dp_recipe("federated", 8.0)["accountant"] == "prv"
    assert "dp.accountant=prv" in bench.dp_train("federated", 8.0)
    # a step-size choice belongs to its accountant: an RDP choice stays behind an RDP row
    m = {"accuracy": 0.8, "macro_f1": 0.8, "loss": 1.0}
    rows = [Result("banking77", "federated", "fedavgm", 8.0, m, 1.0, 7.998, extra={
        "epsilon_by_accountant": {"rdp": 8.67, "prv": 7.998}, "dp_recipe": {
            "optimizer": "sgd", "lr": 0.005, "batch_size": 1024, "head_lr": 1.4,
            "accountant": "prv", "rounds": 48, "local_steps": 1, "server_momentum": 0.9}}),
            Result("banking77", "federated", "fedavgm", 1.0, m, 1.0, extra={"dp_recipe": {
                "optimizer": "sgd", "lr": 0.005, "batch_size": 1024, "head_lr": 0.1}})]
    old = [{"setting": "federated, fedavgm", "epsilon": e, "head_lr": 0.1, "batch_size": 1024,
            "validation_accuracy": {0.1: 0.6}} for e in (1.0, 8.0)]
    new = [{"setting": "federated, fedavgm", "epsilon": 8.0, "head_lr": 1.4, "batch_size": 1024,
            "accountant": "prv", "validation_accuracy": {1.4: 0.86}}]
    merged = _merged_tuning(old, new, rows)
    assert [(t["epsilon"], t.get("accountant", "rdp")) for t in merged] == [
        (1.0, "rdp"), (8.0, "prv")]
    info = {"cpu": "cpu", "cores": 2, "gpu": "none", "python": "3", "torch": "t", "flwr": "f"}
    text = write_report(tmp_path, "r", rows, prv, 0, 1.0, info, "python -m x", False, "",
                        merged)[0].read_text()
    # a PRV row also shows what the same noise costs by RDP
    assert "| 8.00 (RDP: 8.67) | 1024, 1.4; 48 x 1, momentum 0.9; PRV | 0.8000 |" in text
    assert "| 1024, 0.1; 48 x 1" not in text and "| 1024, 0.1 | 0.8000 |" in text
    assert "| federated, fedavgm | 8 | 1024, PRV | 1.4 |" in text
    with pytest.raises(typer.BadParameter, match="dp_accountant=gdp"):
        main(quick=False, datasets=tmp_path, out=tmp_path, work=tmp_path, seed=0, only="all",
             dp_only=False, scale_set=["dp_accountant=gdp"])
