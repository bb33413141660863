"""Person-level (user-level) DP: `data.privacy_unit = <column>` (issue 27).

Real MiniLM (embedded), PEFT, Opacus, the site's real `train_local` and `FedtuneClient.fit`,
a real `fedtune simulate`. No mocks. What is checked:
- one record per person: person-level and record-level plans have the same σ, q and ε, and
  (with a known seed) train the same update;
- per-person sensitivity: removing all records of any one person moves the clipped sum by at
  most C (noise 0, every person of a small batch), where record-level clipping moves it by more;
- sampling is over persons: inclusion frequency matches q, a person's records come together;
- a record-level run on data with a person column reports the group-privacy bound;
- a small `fedtune simulate` with a person column says "per person" in its ledger and report.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader

from fedtune.client.budget import UnitCounts, plan_run, unit_counts
from fedtune.client.client_app import FedtuneClient, SiteSpec, load_site_dataset
from fedtune.client.person_sampling import PersonCollator, PersonIndex
from fedtune.client.randomness import site_randomness
from fedtune.client.site_config import SitePrivacy
from fedtune.client.site_policy import site_run_config, violations
from fedtune.client.trainer import poisson_sample_rate, train_local
from fedtune.common.config import ConfigError, RunConfig, load_config
from fedtune.common.data import DataError, EncodedDataset, person_groups, write_jsonl
from fedtune.common.demo_data import classification_demo
from fedtune.common.ledger import SCHEMA, PrivacyLedger
from fedtune.common.loading import model_card
from fedtune.common.lora import get_adapter, set_adapter
from fedtune.common.model_cache import get_runtime
from fedtune.common.privacy import epsilon, group_privacy
from fedtune.common.tasks import num_labels, resolve_task
from fedtune.report.data import build_report
from fedtune.report.render_html import render_html
from tests.conftest import FAST, run_fedtune, sets

ROWS = classification_demo(36, 5)
LABELS = json.dumps(sorted({r["label"] for r in ROWS}))
# Persons with 1 to 4 records each (36 records, 15 persons): the largest has 4.
SIZES = [4, 3, 1, 2, 4, 1, 3, 2, 1, 4, 2, 3, 1, 2, 3]
PERSON = [f"p{k:02d}" for k, n in enumerate(SIZES) for _ in range(n)]


def _cfg(*extra: str) -> RunConfig:
    return load_config(None, [
        "model.name=all-minilm-l6-v2", "model.max_length=32", "train.batch_size=4",
        "train.threads=2", "dp.noise_multiplier=1.0", "dp.target_epsilon=1000",
        f"data.labels={LABELS}", "seed=7", *extra,
    ])


def _calibrated(cfg: RunConfig, target: float) -> RunConfig:
    """`cfg` with σ calibrated from a target ε instead of fixed."""
    return cfg.model_copy(update={"dp": cfg.dp.model_copy(
        update={"noise_multiplier": None, "target_epsilon": target})})


@pytest.fixture(scope="module")
def runtime():
    """The site's model (cached per process), with dropout off so that the same records give
    the same gradients in every batch they are in; restored afterwards."""
    cfg = _cfg()
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    drops = [m for m in rt.model.modules() if isinstance(m, torch.nn.Dropout)]
    old = [m.p for m in drops]
    for m in drops:
        m.p = 0.0
    yield rt, task
    for m, p in zip(drops, old, strict=True):
        m.p = p


def _encoded(rt, task, cfg: RunConfig, rows: list[dict], tmp_path: Path,
             name: str = "site") -> EncodedDataset:
    path = tmp_path / name / "train.jsonl"
    write_jsonl(path, rows)
    return load_site_dataset(SiteSpec(name, path, tmp_path / name / "state"), cfg, rt)


def _train(rt, task, cfg: RunConfig, data: EncodedDataset, *, sigma: float, steps: int,
           seed: int | None = 11, person_level: bool | None = None):
    start = get_adapter(rt.model)
    try:
        result = train_local(rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device,
                             train=cfg.train, dp=cfg.dp, noise_multiplier=sigma, steps=steps,
                             seed=seed, person_level=cfg.data.person_level
                             if person_level is None else person_level,
                             max_records_per_person=cfg.data.max_records_per_person)
        return result, [a - b for a, b in zip(get_adapter(rt.model), start, strict=True)]
    finally:
        set_adapter(rt.model, start)


# ------------------------------------------------------------------ one record per person


def test_one_record_per_person_is_the_record_level_mechanism(runtime, tmp_path):
    rt, task = runtime
    rows = [{**r, "patient": f"id{i}"} for i, r in enumerate(ROWS)]
    record = _cfg("dp.delta=1e-3", "dp.noise_multiplier=0.9")
    person = _cfg("dp.delta=1e-3", "dp.noise_multiplier=0.9", "data.privacy_unit=patient")
    n = len(rows)
    # The same plan: σ, q and ε (fixed σ and calibrated from a target ε alike).
    for r_cfg, p_cfg in ((record, person), (_calibrated(record, 4), _calibrated(person, 4))):
        units = unit_counts("patient", "patient", [r["patient"] for r in rows])
        assert units == UnitCounts("patient", "patient", n, 1)
        a = plan_run(r_cfg.dp, records=n, batch_size=4, rounds=3, local_steps=5)
        b = plan_run(p_cfg.dp, records=n, batch_size=4, rounds=3, local_steps=5, units=units)
        assert (a.noise_multiplier, a.sample_rate, a.planned_epsilon) == (
            b.noise_multiplier, b.sample_rate, b.planned_epsilon)
        assert b.privacy_unit == "patient" and a.privacy_unit == "record"
    # With the same known seed, the same batches, clipping and noise: the same update.
    data_r = _encoded(rt, task, record, rows, tmp_path, "rec")
    data_p = _encoded(rt, task, person, rows, tmp_path, "per")
    assert data_r.persons is None and data_p.persons == [f"id{i}" for i in range(n)]
    res_r, upd_r = _train(rt, task, record, data_r, sigma=0.9, steps=3)
    res_p, upd_p = _train(rt, task, person, data_p, sigma=0.9, steps=3)
    assert res_r.sample_rate == res_p.sample_rate == poisson_sample_rate(n, 4)
    assert res_r.examples_seen == res_p.examples_seen == res_p.persons_seen > 0
    for x, y in zip(upd_r, upd_p, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
    assert max(float(np.abs(x).max()) for x in upd_r) > 0


# ------------------------------------------------------------------ sensitivity per person

LR = 1000.0  # a large step: the float32 update then resolves the clipped sum far below C


def _clipped_sum(rt, task, cfg: RunConfig, rows: list[dict], tmp_path: Path, name: str,
                 person_level: bool) -> np.ndarray:
    """The clipped sum of one DP step over the whole batch: q = 1 (batch_size >= units),
    σ = 0, plain SGD at lr LR, so the update is -LR · (clipped sum) / units."""
    data = _encoded(rt, task, cfg, rows, tmp_path, name)
    units = len(set(r["patient"] for r in rows)) if person_level else len(rows)
    res, upd = _train(rt, task, cfg, data, sigma=0.0, steps=1, person_level=person_level)
    assert res.sample_rate == 1.0
    return -np.concatenate([u.ravel() for u in upd]).astype(np.float64) * units / LR


def test_removing_any_person_moves_the_clipped_sum_by_at_most_c(runtime, tmp_path):
    rt, task = runtime
    C = 1e-3  # far below every gradient's norm: every person's contribution is clipped
    rows = [{**r, "patient": p} for r, p in zip(ROWS[:14], PERSON, strict=False)]
    persons = sorted(set(r["patient"] for r in rows))  # 5 persons, 1 to 4 records
    common = ("train.optimizer=sgd", f"train.lr={LR}", "train.batch_size=64", "dp.delta=1e-3",
              f"dp.max_grad_norm={C}", "train.chunk_tokens=40")  # several chunks per batch
    person = _cfg(*common, "data.privacy_unit=patient")
    record = _cfg(*common)
    full = _clipped_sum(rt, task, person, rows, tmp_path, "all", True)
    full_rec = _clipped_sum(rt, task, record, rows, tmp_path, "all-rec", False)
    moved, moved_rec = {}, {}
    for k, p in enumerate(persons):
        rest = [r for r in rows if r["patient"] != p]
        moved[p] = np.linalg.norm(full - _clipped_sum(rt, task, person, rest, tmp_path,
                                                      f"wo{k}", True))
        if sum(r["patient"] == p for r in rows) > 1:
            moved_rec[p] = np.linalg.norm(full_rec - _clipped_sum(rt, task, record, rest,
                                                                  tmp_path, f"wor{k}", False))
    assert max(moved.values()) <= C * (1 + 1e-3), moved
    assert min(moved.values()) >= C * (1 - 1e-2), moved  # each person's gradient was clipped
    # Record-level clipping bounds each record, not a person: a person with several records
    # moves the sum by more than C.
    assert max(moved_rec.values()) > 1.5 * C, moved_rec


# ------------------------------------------------------------------ sampling over persons


def test_poisson_sampling_is_over_persons(runtime, tmp_path):
    rt, task = runtime
    rows = [{**r, "patient": p} for r, p in zip(ROWS, PERSON, strict=True)]
    cfg = _cfg("data.privacy_unit=patient", "dp.delta=1e-3")
    data = _encoded(rt, task, cfg, rows, tmp_path)
    groups = person_groups(data.persons)
    q = poisson_sample_rate(len(groups), 4)
    # The loader train_local builds, through Opacus' Poisson sampler with a secret generator.
    draws = 4000
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(
        PersonIndex(len(groups)), batch_size=4,
        collate_fn=PersonCollator(data, groups, rt.pad_id, None, site_randomness(None,
                                                                                 rt.device).sampler),
        generator=site_randomness(None, rt.device).sampler))
    assert loader.sample_rate == q
    counts = np.zeros(len(groups))
    for _ in range(draws // len(loader)):
        for idx in loader.batch_sampler:
            counts[idx] += 1
    n = draws // len(loader) * len(loader)
    sd = math.sqrt(n * q * (1 - q))
    assert np.all(np.abs(counts - n * q) < 5 * sd), (counts, n * q)  # each person: Bin(n, q)
    assert abs(counts.sum() - n * q * len(groups)) < 5 * sd * math.sqrt(len(groups))

    # train_local: every batch holds all the records of each person it sampled, or exactly
    # max_records_per_person of them.
    class Recording(EncodedDataset):
        batches: list[list[int]] = []

        def __getitems__(self, rows_: list[int]) -> list[dict]:
            self.batches.append(list(rows_))
            return [self.items[i] for i in rows_]

    for cap in (None, 2):
        rec = Recording(data.items, data.persons)
        rec.batches = []
        step_cfg = _cfg("data.privacy_unit=patient", "dp.delta=1e-3",
                        *(("data.max_records_per_person=2",) if cap else ()))
        res, _ = _train(rt, task, step_cfg, rec, sigma=1.0, steps=12, seed=None)
        assert res.sample_rate == q and res.secret_randomness
        assert rec.batches and sum(len(b) for b in rec.batches) == res.examples_seen
        for batch in rec.batches:
            for person in {data.persons[i] for i in batch}:
                have = [i for i in batch if data.persons[i] == person]
                own = [i for i, p in enumerate(data.persons) if p == person]
                assert len(have) == (len(own) if cap is None else min(cap, len(own)))
                assert set(have) <= set(own)


# ------------------------------------------------------------------ ledger, report, card


def _fit(tmp_path: Path, cfg: RunConfig, rows: list[dict], name: str) -> PrivacyLedger:
    path = tmp_path / name / "train.jsonl"
    write_jsonl(path, rows)
    spec = SiteSpec(name, path, tmp_path / name / "state")
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    params = rt.initial_adapter
    try:
        FedtuneClient(spec, cfg).fit(params, {"run_id": name, "server_round": 1,
                                              "local_steps": 2, "num_rounds": 1})
    finally:
        set_adapter(rt.model, params)
    return PrivacyLedger(spec.state_dir, name)


def test_record_level_report_states_the_group_bound_of_the_largest_person(runtime, tmp_path):
    rows = [{**r, "patient": p} for r, p in zip(ROWS, PERSON, strict=True)]
    cfg = _calibrated(_cfg("data.person_column=patient", "dp.delta=1e-3"), 2.0)
    ledger = _fit(tmp_path, cfg, rows, "site-0")
    row = ledger.rows()[0]
    assert row.privacy_unit == "record" and row.persons is None
    plan = ledger.plan("site-0")
    assert (plan.person_column, plan.persons, plan.max_person_records) == ("patient", 15, 4)
    assert plan.sample_rate == poisson_sample_rate(36, 4)  # over records
    report = build_report(ledger.path)
    site = report["sites"][0]
    eps = site["runs"][0]["epsilon_rdp"]
    g_eps, g_delta = group_privacy(eps, 1e-3, 4)
    assert site["group_bound"]["k"] == 4
    assert site["group_bound"]["group_epsilon"] == pytest.approx(4 * eps)
    assert g_delta == pytest.approx(4 * math.exp(3 * eps) * 1e-3)
    html = render_html(report)
    assert "per record" in html and "group privacy" in html and f"{g_eps:.3g}" in html
    assert any("largest person (4 records)" in w["message"] for w in report["warnings"])
    assert "per record" in model_card(cfg) and "group privacy" in model_card(cfg)


def test_person_level_ledger_counts_persons_and_delta_against_persons(runtime, tmp_path):
    rows = [{**r, "patient": p} for r, p in zip(ROWS, PERSON, strict=True)]
    cfg = _cfg("data.privacy_unit=patient", "dp.delta=1e-2")
    ledger = _fit(tmp_path, cfg, rows, "site-1")
    row = ledger.rows()[0]
    assert (row.privacy_unit, row.persons, row.records) == ("patient", 15, 36)
    assert row.sample_rate == poisson_sample_rate(15, 4)
    assert row.epsilon_run == pytest.approx(epsilon([row.mechanism], 1e-2))
    site = build_report(ledger.path)["sites"][0]
    assert site["privacy_unit"] == "patient" and site["group_bound"] is None
    assert "per person (column patient)" in render_html(build_report(ledger.path))
    assert "per person (column `patient`)" in model_card(cfg)
    # δ is checked against persons (15 here), not records.
    refused = _fit(tmp_path, _cfg("data.privacy_unit=patient", "dp.delta=0.07"), rows, "site-2")
    assert "1/persons = 1/15" in refused.declines()[0].reason


def test_config_policy_and_ledger_migration(tmp_path):
    with pytest.raises(ConfigError, match="max_records_per_person"):
        _cfg("data.max_records_per_person=2")
    with pytest.raises(ConfigError, match="person_column"):
        _cfg("data.privacy_unit=patient", "data.person_column=visit")
    # A record without the person column: file:line:key.
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{**ROWS[0], "patient": "a"}, ROWS[1]])
    cfg = _cfg("data.privacy_unit=patient")
    task = resolve_task(cfg)
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing key 'patient'"):
        load_site_dataset(SiteSpec("s", path, tmp_path / "s"), cfg,
                          get_runtime(cfg, task, num_labels(cfg, task)))
    # A site policy requires its person column; a run asking another one is refused.
    policy = SitePrivacy(privacy_unit="patient")
    assert site_run_config(_cfg(), policy).data.privacy_unit == "patient"
    assert violations(policy, _cfg()) == []
    assert "privacy.privacy_unit" in violations(policy, _cfg("data.privacy_unit=visit"))[0]
    # An old ledger (no privacy unit columns) reads as per record.
    old = tmp_path / "old" / PrivacyLedger.FILENAME
    old.parent.mkdir()
    with sqlite3.connect(old) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO rounds VALUES ('r', 's', 1, 1.0, 0.1, 2, 1.0, 1e-5, 100, "
                   "'rdp', 1.0, 1.0, 0.0)")
    db.close()
    assert PrivacyLedger.from_file(old).rows()[0].privacy_unit == "record"


# ------------------------------------------------------------------ a real simulation


def test_simulate_with_a_person_column(tmp_path):
    """FFA-LoRA under SecAgg+, 3 sites (FedAvg without SecAgg+: benchmarks/bench_person_level)."""
    data = tmp_path / "patients.jsonl"
    write_jsonl(data, [{**r, "patient": f"p{i % 20}"} for i, r in enumerate(
        classification_demo(80, 3))])
    res = run_fedtune("simulate", *sets(
        *FAST, f"output.dir={tmp_path}", "output.run_name=person", f"data.train={data}",
        "model.name=all-minilm-l6-v2", "federation.num_sites=3", "federation.rounds=1",
        "federation.strategy=ffa_lora", "federation.secagg=true",
        "data.privacy_unit=patient", "dp.delta=1e-3", "data.text_column=text",
        "data.label_column=label"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "person"
    report = build_report(run_dir)
    for site in report["sites"]:
        assert site["privacy_unit"] == "patient" and site["persons"] >= 5
        plan = site["runs"][0]["plan"]
        assert plan["sample_rate"] == poisson_sample_rate(site["persons"], 4)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["status"] for s in metrics[-1]["sites"]] == ["ok"] * 3
    # Each patient is at one site only (the IID split keeps a person's records together).
    sites = [{json.loads(x)["patient"] for x in (p).read_text().splitlines()}
             for p in sorted(run_dir.glob("sites/site-*/data/train.jsonl"))]
    assert len(sites) == 3 and sum(map(len, sites)) == len(set().union(*sites))
    assert "per person (column patient)" in render_html(report)
    assert "per person (column `patient`)" in (run_dir / "adapter" / "README.md").read_text()
