"""DP settings whose accounting would need unbounded memory or time are refused up front, and
the accounting itself stays bounded whatever it is asked.

The case that motivated it: `dp.noise_multiplier = 0.001` made every site's ledger ask Opacus'
PRV accountant for a grid of 2.9e9 points (21.7 GB); each Ray worker grew until Ray killed it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedtune.client.budget import plan_run
from fedtune.common.config import DPConfig
from fedtune.common.privacy import (
    MAX_TARGET_EPSILON,
    MIN_NOISE_MULTIPLIER,
    PrivacyBudgetError,
    _bisect_noise_multiplier,
    epsilon,
)
from tests.conftest import run_fedtune, sets


def test_simulate_refuses_unbounded_dp_settings_at_once_naming_the_keys(tmp_path: Path):
    """Exit 2 before any site starts: no run directory, no Ray. Measured as CPU time of the
    child (the wall time on a shared 2-core machine says little): about 8 s, all imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_fedtune("simulate", *sets(
        f"output.dir={tmp_path}", "model.name=all-minilm-l6-v2", "federation.num_sites=5",
        "dp.noise_multiplier=0.001", "dp.target_epsilon=1e12",
    ), timeout=180)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "dp.noise_multiplier = 0.001 is below 0.1" in err, err
    assert "allowed: dp.noise_multiplier >= 0.1" in err, err
    assert "dp.target_epsilon = 1e+12 is above 1000" in err, err
    assert "allowed: 0 < dp.target_epsilon <= 1000" in err, err
    assert cpu < 40, f"the refusal took {cpu:.1f} s of CPU"
    assert not any(tmp_path.iterdir()), "a refused run leaves no run directory"
    assert "fedtune simulate —" not in res.stdout  # refused before the run's header


def test_a_site_plan_refuses_them_too():
    """A site daemon plans with plan_run (client/privacy_gate.py): same refusal, its prefix."""
    with pytest.raises(PrivacyBudgetError, match=r"site-a: dp.noise_multiplier = 0.001"):
        plan_run(DPConfig(noise_multiplier=0.001, target_epsilon=8.0), records=100,
                 batch_size=8, rounds=1, local_steps=1, where="site-a: ")
    with pytest.raises(PrivacyBudgetError, match=r"dp.target_epsilon = 5000 is above 1000"):
        plan_run(DPConfig(target_epsilon=5000.0), records=100, batch_size=8, rounds=1,
                 local_steps=1)
    # the edges are allowed
    plan_run(DPConfig(noise_multiplier=MIN_NOISE_MULTIPLIER, target_epsilon=MAX_TARGET_EPSILON),
             records=100, batch_size=8, rounds=1, local_steps=1)


PROBE = textwrap.dedent("""
    import json, resource, sys, time, tracemalloc
    cap = 2 * 2**30  # a runaway grid fails here instead of taking the machine
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from fedtune.common.privacy import epsilon
    t = time.process_time()
    tracemalloc.start()
    prv = epsilon([(0.001, 0.2, 4)], 1e-5, "prv")
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"prv": prv, "rdp": epsilon([(0.001, 0.2, 4)], 1e-5, "rdp"),
                      "peak_mb": peak / 2**20, "cpu_s": time.process_time() - t}))
""")


@pytest.mark.slow
def test_prv_accounting_of_a_tiny_noise_multiplier_stays_bounded():
    """What a site's ledger computes for sigma = 0.001 (Opacus alone: 21.7 GB): at most
    PRV_MAX_POINTS grid points, ~130 MB, and a valid upper bound (here RDP's)."""
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_mb"] < 300, out
    assert out["prv"] <= out["rdp"] and out["prv"] > 1e5, out


def test_calibration_matches_opacus_bisection():
    """The bounded bisection is Opacus' (same bracket, tolerance, accountant): same sigma."""
    start = time.process_time()
    ours = _bisect_noise_multiplier(3.0, 1e-5, 0.25, 40, "rdp")
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25,
                                  steps=40, accountant="rdp", epsilon_tolerance=0.01)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert epsilon([(ours, 0.25, 40)], 1e-5) <= 3.0
    assert time.process_time() - start < 60
