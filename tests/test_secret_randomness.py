"""A site's Poisson batches and noise are secret from the coordinator (issue 20, item 1).

Two sites the coordinator cannot tell apart (same run config and seed, same site id, same data,
same round) send different updates and draw different batches; nothing the coordinator knows
(run config, site id, round, what the site sends) reproduces the batches a site actually drew.
Only the explicit `dp.reproducible_seed` makes them reproducible, and the ledger says which.

Real MiniLM (embedded), PEFT, Opacus, the site's real `FedtuneClient.fit`; the batches are read
off the dataset as the DataLoader fetches them. No mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedtune.client import client_app
from fedtune.client.client_app import FedtuneClient, SiteSpec, load_site_dataset
from fedtune.client.randomness import (
    coordinator_seed,
    round_seed,
    secret_cpu_generator,
    site_randomness,
)
from fedtune.client.supernode_app import run_config_for_site
from fedtune.client.trainer import train_local
from fedtune.common.config import RunConfig, load_config
from fedtune.common.data import EncodedDataset, read_records, write_jsonl
from fedtune.common.demo_data import classification_demo
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.lora import get_adapter, set_adapter
from fedtune.common.model_cache import get_runtime
from fedtune.common.tasks import encode_records, num_labels, resolve_task

SITE = "site-0"
ROUND = 1
STEPS = 4
ROWS = classification_demo(40, 3)
LABELS = json.dumps(sorted({r["label"] for r in ROWS}))


class RecordingDataset(EncodedDataset):
    """The site's encoded records; remembers the indices of each batch the DataLoader fetches."""

    def __init__(self, items: list[dict]) -> None:
        super().__init__(items)
        self.batches: list[list[int]] = []

    def __getitems__(self, indices: list[int]) -> list[dict]:
        self.batches.append(sorted(int(i) for i in indices))
        return [self.items[i] for i in indices]


def _cfg(*extra: str) -> RunConfig:
    return load_config(None, [
        "model.name=all-minilm-l6-v2", "model.max_length=32", "train.batch_size=4",
        "train.threads=1", "dp.noise_multiplier=1.0", "dp.target_epsilon=1000",
        f"data.labels={LABELS}", "seed=1234", *extra,
    ])


def _fit(tmp_path: Path, name: str, cfg: RunConfig
         ) -> tuple[list[np.ndarray], dict, list[list[int]], PrivacyLedger]:
    """One round of the real site code; returns what it sends and the batches it drew."""
    data = tmp_path / name / "train.jsonl"
    write_jsonl(data, ROWS)
    spec = SiteSpec(SITE, data, tmp_path / name / "state")  # same id: indistinguishable sites
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    encoded = load_site_dataset(spec, cfg, rt)
    recording = RecordingDataset(encoded.items)
    key = next(k for k, v in client_app._DATA_CACHE.items() if v is encoded)
    client_app._DATA_CACHE[key] = recording  # fit reads the site's data through its cache
    params = rt.initial_adapter
    torch.manual_seed(0)  # the same dropout masks at both sites: only the DP randomness differs
    try:
        delta, _, metrics = FedtuneClient(spec, cfg).fit(
            params, {"run_id": "run-1", "server_round": ROUND, "local_steps": STEPS,
                     "num_rounds": 2})
    finally:
        set_adapter(rt.model, params)
    return delta, metrics, recording.batches, PrivacyLedger(spec.state_dir, SITE)


def _encoded(cfg: RunConfig, tmp_path: Path) -> list[dict]:
    """The site's records as its own code encodes them."""
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    records = read_records(tmp_path / "rows.jsonl")
    return encode_records(records, rt.tokenizer, cfg, rt.task, cfg.data.labels).items


def _coordinator_prediction(cfg: RunConfig, records: list[dict]) -> list[list[int]]:
    """The batches a coordinator computes from what it knows: the run seed, the site's id and
    the round (the seed fedtune used before issue 20), run through the site's own code."""
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    data = RecordingDataset(records)
    start = get_adapter(rt.model)
    try:
        train_local(rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device,
                    train=cfg.train, dp=cfg.dp, noise_multiplier=1.0, steps=STEPS,
                    seed=coordinator_seed(cfg.seed, SITE, ROUND))
    finally:
        set_adapter(rt.model, start)
    return data.batches


def test_secret_generators_differ_and_seeded_ones_repeat():
    a, b = site_randomness(None, torch.device("cpu")), site_randomness(None, torch.device("cpu"))
    assert a.secret and b.secret
    assert not torch.equal(torch.rand(64, generator=a.sampler), torch.rand(64, generator=b.sampler))
    assert not torch.equal(torch.randn(64, generator=a.noise), torch.randn(64, generator=b.noise))
    c, d = site_randomness(7, torch.device("cpu")), site_randomness(7, torch.device("cpu"))
    assert not c.secret
    assert torch.equal(torch.rand(64, generator=c.sampler), torch.rand(64, generator=d.sampler))
    assert torch.equal(torch.randn(64, generator=c.noise), torch.randn(64, generator=d.noise))
    # The secret CPU state is not one of the 2**32 states manual_seed can reach (it keeps only
    # 32 bits of the seed): the state words are not those of its own recorded seed.
    g = secret_cpu_generator()
    reseeded = torch.Generator().manual_seed(g.initial_seed())
    assert not torch.equal(torch.rand(64, generator=g), torch.rand(64, generator=reseeded))


def test_round_seed_is_secret_unless_reproducible_is_asked():
    assert round_seed(_cfg().dp, 1234, SITE, ROUND) is None
    assert round_seed(_cfg("dp.reproducible_seed=true").dp, 1234, SITE, ROUND) == \
        coordinator_seed(1234, SITE, ROUND)


def test_indistinguishable_sites_draw_different_batches_and_send_different_updates(tmp_path):
    cfg = _cfg()
    delta_a, metrics_a, batches_a, ledger_a = _fit(tmp_path, "a", cfg)
    delta_b, metrics_b, batches_b, ledger_b = _fit(tmp_path, "b", cfg)
    assert metrics_a["status"] == metrics_b["status"] == "ok"
    assert len(batches_a) == len(batches_b) == STEPS
    assert batches_a != batches_b  # different Poisson masks (P(equal) ~ 1e-14)
    assert any(not np.array_equal(x, y) for x, y in zip(delta_a, delta_b, strict=True))
    # Nothing the coordinator knows reproduces them: its prediction from (seed, site, round)
    # is neither site's batches.
    predicted = _coordinator_prediction(cfg, _encoded(cfg, tmp_path))
    assert len(predicted) == STEPS and predicted not in (batches_a, batches_b)
    # Each site's ledger says its randomness was secret.
    assert [r.secret_randomness for r in ledger_a.rows() + ledger_b.rows()] == [True, True]


def test_reproducible_seed_is_explicit_and_recorded(tmp_path):
    cfg = _cfg("dp.reproducible_seed=true")
    delta_a, _, batches_a, ledger_a = _fit(tmp_path, "a", cfg)
    delta_b, _, batches_b, _ = _fit(tmp_path, "b", cfg)
    assert batches_a == batches_b
    assert all(np.array_equal(x, y) for x, y in zip(delta_a, delta_b, strict=True))
    # ... and whoever knows the seed predicts every batch: what the report warns about.
    assert _coordinator_prediction(cfg, _encoded(cfg, tmp_path)) == batches_a
    assert [r.secret_randomness for r in ledger_a.rows()] == [False]


def test_noise_only_steps_use_the_sites_generator(tmp_path):
    """Empty Poisson batches are pure noise, drawn from the site's generator: with a fixed seed
    the global torch RNG changes nothing, without one two runs differ."""
    cfg = _cfg("train.batch_size=1")
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    data = EncodedDataset(_encoded(cfg, tmp_path) * 5)  # 200 records, q = 1/200
    start = get_adapter(rt.model)

    def run(seed: int | None, global_seed: int) -> tuple[int, list[np.ndarray]]:
        torch.manual_seed(global_seed)
        try:
            r = train_local(rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device,
                            train=cfg.train, dp=cfg.dp, noise_multiplier=1.0, steps=2,
                            seed=seed)
            return r.examples_seen, [a - s for a, s in zip(get_adapter(rt.model), start,
                                                           strict=True)]
        finally:
            set_adapter(rt.model, start)

    # A seed whose two Poisson batches are both empty (P ~ 0.13 each).
    seed = next(s for s in range(200) if run(s, 0)[0] == 0)
    (_, one), (_, two) = run(seed, 1), run(seed, 2)
    assert all(np.abs(d).max() > 0 for d in one)  # noise moved every tensor
    assert all(np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    secret = [run(None, 1)[1] for _ in range(2)]
    assert any(not np.array_equal(x, y) for x, y in zip(*secret, strict=True))


def test_a_deployed_site_ignores_a_request_for_reproducible_seeds(tmp_path):
    """The coordinator's run config asks for reproducible seeds; the site's config wins."""
    from flwr.common import Context, RecordDict

    from fedtune.client.site_config import load_site_config
    from fedtune.common.protocol import RUN_CONFIG_KEY

    site_toml = tmp_path / "site.toml"
    site_toml.write_text(f'site_id = "{SITE}"\ndata = "train.jsonl"\nstate_dir = "state"\n'
                         '[coordinator]\naddress = "localhost:9092"\n')
    site = load_site_config(site_toml, check_files=False)
    asked = _cfg("dp.reproducible_seed=true")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config={RUN_CONFIG_KEY: asked.model_dump_json()})
    assert run_config_for_site(context, site).dp.reproducible_seed is False


def test_ledger_and_report_say_when_randomness_was_not_secret(tmp_path):
    """Old ledgers migrate (unknown); a seeded run is flagged in the warnings and the wording."""
    import sqlite3

    from fedtune.report.data import build_report
    from fedtune.report.wording import sample_level

    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / PrivacyLedger.FILENAME) as db:  # a ledger from before the column
        db.execute("CREATE TABLE rounds (run_id TEXT, site_id TEXT, round INTEGER, "
                   "noise_multiplier REAL, sample_rate REAL, steps INTEGER, max_grad_norm REAL, "
                   "delta REAL, records INTEGER, accountant TEXT, epsilon_run REAL, "
                   "epsilon_total REAL, recorded_at REAL)")
        db.execute(f"INSERT INTO rounds VALUES ('old', '{SITE}', 1, 1.0, 0.1, 5, 1.0, 1e-5, 100, "
                   "'rdp', 1.5, 1.5, 1.0)")
    ledger = PrivacyLedger(state, SITE)
    spend = dict(noise_multiplier=1.0, sample_rate=0.1, steps=5, max_grad_norm=1.0, delta=1e-5,
                 records=100, accountant="rdp")
    ledger.record_round(run_id="seeded", round=1, secret_randomness=False, **spend)
    ledger.record_round(run_id="secret", round=1, secret_randomness=True, **spend)
    assert [r.secret_randomness for r in ledger.rows()] == [None, False, True]

    report = build_report(state / PrivacyLedger.FILENAME)
    messages = [w["message"] for w in report["warnings"]]
    seeded = [m for m in messages if "run seeded" in m]
    assert seeded and "does not hold against whoever knows the seed" in seeded[0]
    assert any("run old" in m and "older fedtune" in m for m in messages)
    assert not any("run secret" in m and "seed" in m for m in messages)
    (site,) = report["sites"]
    runs = {r["run_id"]: r for r in site["runs"]}
    assert "does not hold against whoever knows the seed" in sample_level(site, runs["seeded"],
                                                                           1.0)
    assert "WARNING" not in sample_level(site, runs["secret"], 1.0)
