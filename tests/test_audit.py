"""The one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023): its bound against a
brute-force computation, and that the audit fails a deliberately broken DP mechanism (real Opacus,
real MiniLM) while passing the correct one, and `fedtune audit` end to end."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import typer

from fedtune.common.audit_bound import audit_bound, epsilon_lower_bound, p_value
from tests.conftest import run_fedtune, sets

# Bound ------------------------------------------------------------------------------------------


def _brute_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2's bound by enumerating all 2^r right/wrong patterns of the r guesses (exact
    rational arithmetic for the probabilities of eps-DP randomized response)."""
    p = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    count = [Fraction(0)] * (r + 1)  # P[exactly j right]
    for pattern in itertools.product((0, 1), repeat=r):
        j = sum(pattern)
        count[j] += p ** j * (1 - p) ** (r - j)
    tail = sum(count[v:], Fraction(0))
    alpha = max((sum(count[v - i:v], Fraction(0)) / i for i in range(1, v + 1)),
                default=Fraction(0))
    return min(float(tail + 2 * m * Fraction(delta) * alpha), 1.0)


@pytest.mark.parametrize(("m", "r", "v"), [(10, 4, 4), (12, 10, 8), (16, 12, 7), (8, 8, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delta", [0.0, 1e-3])
def test_p_value_matches_brute_force(m: int, r: int, v: int, eps: float, delta: float):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_brute_p_value(m, r, v, eps, delta),
                                                         rel=1e-9, abs=1e-12)


def test_lower_bound_is_the_largest_rejected_epsilon():
    for m, r, v, delta in [(12, 10, 10, 0.0), (12, 12, 11, 1e-3), (1000, 200, 180, 1e-5)]:
        eps = epsilon_lower_bound(m, r, v, delta, beta=0.05)
        assert eps > 0
        assert p_value(m, r, v, eps, delta) <= 0.05 < p_value(m, r, v, eps + 1e-4, delta)


def test_lower_bound_sanity_figures():
    # All of r guesses right, delta = 0: the bound solves p^r = beta, eps = log(p / (1 - p)).
    p = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.05) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-4)
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5, 0.05) > 5
    # Chance accuracy shows nothing; more guesses at the same accuracy show more.
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.05) == 0.0
    assert (epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05)
            < epsilon_lower_bound(1000, 500, 450, 1e-5, 0.05))
    # delta's term 2 m delta alpha: a large m x delta weakens the bound.
    assert (epsilon_lower_bound(10_000, 100, 100, 1e-6, 0.05)
            > epsilon_lower_bound(10_000, 100, 100, 2e-6, 0.05))


def test_audit_bound_guesses_top_and_bottom():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = audit_bound(included.astype(float), included, delta=1e-5)
    assert perfect.correct == perfect.guesses and perfect.epsilon > 4
    noise = audit_bound(rng.normal(size=1000), included, delta=1e-5)
    assert noise.epsilon < 0.5


def test_canaries_sit_on_distinct_lora_a_coordinates():
    import torch

    from fedtune.client.canaries import canary_coordinates

    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    a, b, head = (torch.nn.Parameter(torch.zeros(s)) for s in ((2, 3), (3, 2), (5,)))
    named = [("x.frozen", frozen), ("l.lora_A.default.weight", a),
             ("l.lora_B.default.weight", b), ("classifier.modules_to_save.default.weight", head)]
    coords = canary_coordinates(named, 6, seed=0)
    # Indices count trainable tensors only (the trainer's order): A is the first of them.
    assert sorted(coords) == [(0, i) for i in range(6)]
    with pytest.raises(ValueError, match="7 canaries"):
        canary_coordinates(named, 7, seed=0)


# White-box audit of the trainer: correct vs deliberately broken -------------------------------

SIGMA, STEPS = 7.0, 10  # full batch (q = 1): the accountant's epsilon is about 2


@pytest.fixture(scope="module")
def site():
    """MiniLM + LoRA and 8 records trained full-batch (q = 1): few, cheap steps."""
    from fedtune.common.config import LoraSettings, RunConfig
    from fedtune.common.data import Record
    from fedtune.common.demo_data import classification_demo
    from fedtune.common.lora import apply_lora, get_adapter
    from fedtune.common.models import load_base_model
    from fedtune.common.tasks import encode_records

    labels = ["balance", "card_lost", "pin", "transfer"]
    base, tok, dev = load_base_model("all-minilm-l6-v2", "classification", num_labels=4,
                                     labels=labels)
    model = apply_lora(base, "classification", LoraSettings(r=4))
    cfg = RunConfig.model_validate({"model": {"name": "all-minilm-l6-v2", "max_length": 24},
                                    "data": {"labels": labels}})
    records = [Record(r, "demo", i + 1) for i, r in enumerate(classification_demo(8))]
    data = encode_records(records, tok, cfg, "classification", labels)
    return model, data, tok.pad_token_id, dev, get_adapter(model)


def _audit(site, train_fn=None):
    from fedtune.client.trainer import train_local
    from fedtune.common.config import DPConfig, TrainConfig
    from fedtune.common.lora import set_adapter
    from fedtune.simulations.audit import audit_local

    model, data, pad_id, dev, initial = site
    set_adapter(model, initial)
    dp = DPConfig(noise_multiplier=SIGMA, target_epsilon=None, delta=1e-5)
    return audit_local(model, data, task="classification", pad_id=pad_id, device=dev,
                       train=TrainConfig(batch_size=8, lr=0.05, optimizer="sgd"), dp=dp,
                       noise_multiplier=SIGMA, steps=STEPS, m=500,
                       train_fn=train_fn or train_local)


def test_correct_mechanism_passes(site):
    result = _audit(site)
    assert 1.5 < result.accountant_epsilon < 2.5
    assert result.passed and result.lower_bound <= result.accountant_epsilon
    assert result.lower_bound > 0  # the attack sees something: the canaries are really there


def _show_fails(result) -> None:
    from fedtune.cli.audit import show_result

    with pytest.raises(typer.Exit) as exc:
        show_result(result, None)
    assert exc.value.exit_code == 1


def test_noise_scaled_down_is_caught(site, capsys):
    from fedtune.client.trainer import train_local

    def tenth_noise(*args, noise_multiplier: float, **kwargs):  # the ledger keeps sigma
        return train_local(*args, noise_multiplier=noise_multiplier / 10, **kwargs)

    result = _audit(site, tenth_noise)
    assert not result.passed and result.lower_bound > result.accountant_epsilon
    _show_fails(result)
    assert "AUDIT FAILED" in capsys.readouterr().err


def _dp_optimizer_classes() -> list[type]:
    """Opacus' DPOptimizer and every subclass loaded (fedtune's own included)."""
    from opacus.optimizers import DPOptimizer

    found, todo = [], [DPOptimizer]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_clipping_disabled_is_caught(site, monkeypatch):
    from opacus.optimizers import optimizer as opacus_optimizer

    import fedtune.client.trainer  # noqa: F401  (loads the DP optimizer the trainer uses)

    def sum_unclipped(self) -> None:  # the clipped sum, without the clipping
        for p in self.params:
            g = self._get_flat_grad_sample(p).float().sum(dim=0)
            p.summed_grad = g if p.summed_grad is None else p.summed_grad + g
            opacus_optimizer._mark_as_processed(p.grad_sample)

    for cls in _dp_optimizer_classes():
        if "clip_and_accumulate" in vars(cls):
            monkeypatch.setattr(cls, "clip_and_accumulate", sum_unclipped)
    result = _audit(site)
    assert not result.passed and result.lower_bound > result.accountant_epsilon


# `fedtune audit` end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_fedtune_audit_end_to_end(tmp_path: Path):
    res = run_fedtune("audit", "--canaries", "200", *sets(
        "model.name=all-minilm-l6-v2", "model.max_length=32", "train.local_steps=3",
        "train.batch_size=8", "data.demo_records=60", "data.max_eval_records=8",
        "federation.num_sites=2", "federation.rounds=1", f"output.dir={tmp_path}",
        "output.run_name=audit", "dp.target_epsilon=4"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lower bound" in res.stdout and "accountant ε" in res.stdout
    run_dir = tmp_path / "audit"
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["mode"] == "white-box" and audit["m"] == 200 and audit["passed"]
    assert audit["accountant_epsilon"] == pytest.approx(4.0, abs=0.05)
    assert 0 <= audit["lower_bound"] <= audit["accountant_epsilon"]
    # The auditor's secret and observations stay in its own folder; only site-0 has them.
    assert (run_dir / "sites" / "site-0" / "audit" / "observations.jsonl").is_file()
    assert not (run_dir / "sites" / "site-1" / "audit").exists()
    # The report carries the audit.
    from fedtune.report import build_report

    report = build_report(run_dir)
    assert report["audit"]["lower_bound"] == pytest.approx(audit["lower_bound"])
    assert "does not prove the guarantee" in report["audit"]["meaning"]



# A sample predictable to the coordinator: caught by the white-box attack that knows it ---------

# q = 1/50, 200 steps, sigma 1.5: the accountant (RDP, amplified by subsampling) gives eps 0.97.
# With the sample known, a canary's score is a k-fold Gaussian, k ~ qT = 4: mu = sqrt(4)/1.5
# ~ 1.3-GDP (eps ~ 5.5 at delta 1e-5), of which m = 1000 canaries show ~ 2.0 (1.4-2.9 in 200
# simulated runs; 5.3 at most, every guess right). The same attack on the secret sample showed
# at most 0.15 there, the final-delta score (mu = q sqrt(T) / sigma ~ 0.19) at most 0.54.
KNOWN_Q_RECORDS, KNOWN_STEPS, KNOWN_SIGMA, RUN_SEED = 50, 200, 1.5, 42


@pytest.fixture(scope="module")
def small_q_site():
    """MiniLM + LoRA (common.model_cache) and 50 records, batch 1: q = 1/50."""
    from fedtune.common.config import RunConfig
    from fedtune.common.data import Record
    from fedtune.common.demo_data import classification_demo
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.tasks import encode_records

    labels = ["balance", "card_lost", "pin", "transfer"]
    cfg = RunConfig.model_validate({"model": {"name": "all-minilm-l6-v2", "max_length": 24},
                                    "data": {"labels": labels}})
    rt = get_runtime(cfg, "classification", len(labels))
    demo = classification_demo(KNOWN_Q_RECORDS)
    data = encode_records([Record(r, "demo", i + 1) for i, r in enumerate(demo)], rt.tokenizer,
                          cfg, "classification", labels)
    return rt, data


@pytest.mark.parametrize("predictable", [True, False], ids=["predictable", "secret"])
def test_known_sample_attack_catches_a_predictable_sample(small_q_site, predictable: bool):
    from fedtune.common.config import DPConfig, TrainConfig
    from fedtune.common.lora import set_adapter
    from fedtune.simulations.audit import audit_known_sample

    rt, data = small_q_site
    set_adapter(rt.model, rt.initial_adapter)
    try:
        aware, final = audit_known_sample(
            rt.model, data, task="classification", pad_id=rt.pad_id, device=rt.device,
            train=TrainConfig(batch_size=1, lr=0.05, optimizer="sgd"),
            dp=DPConfig(noise_multiplier=KNOWN_SIGMA, target_epsilon=None, delta=1e-5),
            noise_multiplier=KNOWN_SIGMA, steps=KNOWN_STEPS, run_seed=RUN_SEED,
            predictable=predictable, m=1000)
    finally:
        set_adapter(rt.model, rt.initial_adapter)  # the runtime is shared within the process
    assert 0.9 < aware.accountant_epsilon < 1.05
    # The final-delta score (audit_local's) cannot use the sample: it passes either way.
    assert final.passed
    if predictable:  # a k-fold Gaussian, not amplified by subsampling: more than accounted
        assert not aware.passed and aware.lower_bound > aware.accountant_epsilon
        _show_fails(aware)
    else:  # the replayed sample is unrelated to the secret one
        assert aware.passed and aware.lower_bound < 0.5
