"""Start-up validation of the site daemon and the coordinator: clear errors naming the key,
before any process is started. Real CLI in a subprocess, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.client.site_config import load_site_config
from fedtune.common.config import ConfigError, DPConfig
from fedtune.server.certs import create_site_key, init_ca


def fedtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "certs")
    create_site_key(tmp_path / "certs", "hospital-a")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    return tmp_path


def write_site(d: Path, body: str = "", **over: str) -> Path:
    values = {
        "site_id": '"hospital-a"', "data": '"train.jsonl"', "state_dir": '"state"',
        **over,
    }
    top = "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
    path = d / "site.toml"
    path.write_text(
        top + body + "[coordinator]\naddress = \"coord.example.org:9092\"\n"
        "root_certificate = \"certs/ca.crt\"\n"
        "[auth]\nprivate_key = \"certs/sites/hospital-a/site.key\"\n"
    )
    return path


def test_valid_site_config_and_privacy_override(site_dir: Path):
    path = write_site(site_dir, "keep_update_copies = true\n[privacy]\ntarget_epsilon = 2.5\n")
    cfg = load_site_config(path)
    assert cfg.data == site_dir / "train.jsonl"  # relative to the file
    assert cfg.state_dir.is_dir()
    dp = cfg.run_dp(DPConfig(target_epsilon=8.0, delta=1e-5, noise_multiplier=None))
    assert dp.target_epsilon == 2.5 and dp.delta == 1e-5 and dp.enabled
    res = fedtune("client", "--config", str(path), "--check", cwd=site_dir)
    assert res.returncode == 0 and "OK" in res.stdout


@pytest.mark.parametrize(("edit", "expected"), [
    ({"data": '"missing.jsonl"'}, "data: file not found"),
    ({"site_id": '"hospital a!"'}, "site_id: String should match pattern"),
    ({"site_id": None}, "site_id: Field required"),
    ({"colour": '"blue"'}, "colour: unknown key"),
])
def test_site_config_errors_name_the_key(site_dir: Path, edit: dict, expected: str):
    path = write_site(site_dir, **edit)
    with pytest.raises(ConfigError, match=expected):
        load_site_config(path)
    res = fedtune("client", "--config", str(path), cwd=site_dir)
    assert res.returncode == 2
    assert expected.split(":")[0] in res.stderr and "error" in res.stderr


def test_site_key_problems_are_caught_before_start(site_dir: Path):
    key = site_dir / "certs" / "sites" / "hospital-a" / "site.key"
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="auth.private_key: .* accessible by other users"):
        load_site_config(write_site(site_dir))
    key.chmod(0o600)
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="auth.private_key: .* not an unencrypted OpenSSH"):
        load_site_config(write_site(site_dir))
    (site_dir / "certs" / "ca.crt").unlink()
    with pytest.raises(ConfigError, match="coordinator.root_certificate: file not found"):
        load_site_config(write_site(site_dir))
    path = write_site(site_dir, "[privacy]\ndelta = 2.0\n")
    with pytest.raises(ConfigError, match="privacy.delta"):
        load_site_config(path)


def test_plaintext_needs_the_explicit_flag(site_dir: Path):
    path = site_dir / "plain.toml"
    path.write_text('site_id = "s"\ndata = "train.jsonl"\nstate_dir = "st"\n'
                    '[coordinator]\naddress = "127.0.0.1:9092"\n')
    with pytest.raises(ConfigError, match="root_certificate: missing.*--insecure"):
        load_site_config(path)
    assert load_site_config(path, insecure=True).auth is None


def test_server_refuses_to_start_without_certificates(tmp_path: Path):
    res = fedtune("server", "--certs", "nocerts", "--state-dir", "st", cwd=tmp_path)
    assert res.returncode == 2
    assert "fedtune certs init" in res.stderr and "--insecure" in res.stderr
    assert not (tmp_path / "st").exists()  # nothing was started or written
    init_ca(tmp_path / "certs")
    res = fedtune("server", "--certs", "certs", "--state-dir", "st", cwd=tmp_path)
    assert res.returncode == 2 and "server.crt" in res.stderr
