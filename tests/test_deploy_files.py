"""deploy/ without Docker: the YAML parses, every path the files reference exists (after the
documented preparation steps, run for real), and every command they run is a real fedtune
command with real options, whose configuration files validate."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from fedtune.client.site_config import load_site_config
from fedtune.common.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def fedtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


_HELP: dict[str, str] = {}


def check_fedtune_args(args: list[str]) -> None:
    """`args` (after `fedtune`) names a real command and only options it has."""
    cmd = [a for a in args[:2] if not a.startswith("-")]
    if cmd and cmd[0] != "certs":
        cmd = cmd[:1]
    key = " ".join(cmd)
    if key not in _HELP:
        res = fedtune(*cmd, "--help")
        assert res.returncode == 0, f"`fedtune {key}` is not a command: {res.stderr}"
        _HELP[key] = res.stdout
    for opt in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(opt)}\b", _HELP[key]), f"fedtune {key}: no option {opt}"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_all_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_compose_has_a_coordinator_and_three_isolated_sites():
    services = compose()["services"]
    assert set(services) == {"coordinator", *SITES}
    assert "9092:9092" in services["coordinator"]["ports"]
    data, keys = set(), set()
    for site in SITES:
        vols = services[site]["volumes"]
        data |= {v.split(":")[0] for v in vols if v.endswith(":/data:ro")}
        keys |= {v.split(":")[0] for v in vols if "site.key" in v}
        assert any(v.startswith(f"{site}-state:") for v in vols)
        assert not any("ca/ca.key" in v or "server.key" in v or "registry" in v for v in vols)
    assert len(data) == 3 and len(keys) == 3  # one data directory and one key per site


def test_compose_paths_exist_after_the_documented_preparation(tmp_path: Path):
    """Run docs/deployment.md's Compose preparation for real in a copy of deploy/, then check
    every bind-mount source and build file exists and every config file validates."""
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    steps = [["certs", "init", "--dir", "certs"],
             ["certs", "server", "--dir", "certs", "--host", "coordinator"],
             *[["certs", "site", s, "--dir", "certs"] for s in SITES]]
    for step in steps:
        check_fedtune_args(step)
        res = fedtune(*step, cwd=work)
        assert res.returncode == 0, res.stdout + res.stderr
    # demo-data needs torch: write the demo split with the same function instead of a subprocess
    from fedtune.cli.deploy import write_demo_data

    check_fedtune_args(["demo-data", "--config", "x", "--sites", "3", "--out", "x"])
    write_demo_data(load_config(work / "config" / "run.toml", ["federation.num_sites=3"]),
                    work / "demo-data")

    c = compose()
    for name, svc in c["services"].items():
        build = svc["build"]
        assert (work / build["context"] / build["dockerfile"]).resolve().is_file(), name
        for vol in svc["volumes"]:
            src, target = vol.split(":")[:2]
            if src.startswith("."):
                assert (work / src).exists(), f"{name}: {src} missing"
            else:
                assert src in c["volumes"], f"{name}: undeclared volume {src}"
        check_fedtune_args(svc["command"])
    # the files mounted as configs validate; site paths as the containers see them
    run_cfg = load_config(work / "config" / "run.toml")
    assert run_cfg.federation.num_sites == 3 and run_cfg.federation.secagg is None
    for site in SITES:
        cfg = load_site_config(work / "config" / "sites" / f"{site}.toml", check_files=False)
        assert cfg.site_id == site
        assert cfg.coordinator.address.split(":")[0] == "coordinator"  # the cert's SAN
        assert str(cfg.auth.private_key) == "/etc/fedtune/certs/site.key"


def _dockerfile(name: str) -> list[str]:
    text = (DEPLOY / "docker" / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.site"])
def test_dockerfiles_copy_existing_paths_and_run_fedtune(name: str):
    lines = _dockerfile(name)
    assert lines[0].startswith("FROM python:3.11")
    for line in lines:
        if line.startswith("COPY"):
            *sources, _dest = shlex.split(line)[1:]
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src}"
        if line.startswith("RUN") and "-r " in line:
            req = line.split("-r ")[1].split()[0]
            assert (REPO / req).is_file()
    entry = next(x for x in lines if x.startswith("ENTRYPOINT"))
    cmd = next(x for x in lines if x.startswith("CMD"))
    assert yaml.safe_load(entry.split(None, 1)[1]) == ["fedtune"]
    check_fedtune_args(yaml.safe_load(cmd.split(None, 1)[1]))
    # the image copies every folder that pyproject installs (the `fedtune` namespace's parts)
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"fedtune", *setuptools["package-dir"].values()}
    for pkg in folders:
        assert any(x.startswith("COPY") and f" {pkg} " in f" {x} " for x in lines), pkg


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "fedtune-site.service")
    svc = unit["Service"]
    start = shlex.split(svc["ExecStart"])
    assert Path(start[0]).name == "fedtune"
    check_fedtune_args(start[1:])
    check_fedtune_args(shlex.split(svc["ExecStartPre"])[1:])
    assert svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # A configuration error exits 2, and the unit does not restart on it (no restart loop).
    assert svc["RestartPreventExitStatus"].split() == ["2"]
    res = fedtune("client", "--config", str(REPO / "no-such-site.toml"), "--check")
    assert res.returncode == 2 and "no-such-site.toml" in res.stderr


def test_systemd_steps_create_directories_before_installing_into_them():
    doc = (REPO / "docs" / "deployment.md").read_text()
    block = doc[doc.index("### Without Docker: systemd"):]
    block = block[block.index("```sh"):block.index("```", block.index("```sh") + 5)]
    made: set[str] = set()
    for line in block.splitlines():
        args = shlex.split(line.replace("sudo ", "", 1))
        if not args or args[0] != "install":
            continue
        if "-d" in args:  # install -d also makes the parents
            for a in args[1:]:
                if a.startswith("/"):
                    made.update(str(p) for p in [Path(a), *Path(a).parents])
        else:
            target = Path(args[-1])
            assert "-D" in args or str(target.parent) in made, f"{line}: no directory first"


def test_resume_is_documented_for_compose_and_kubernetes():
    compose_text = (DEPLOY / "docker-compose.yml").read_text()
    assert "--resume" in compose_text, "docker-compose.yml does not say how to resume"
    lines = compose_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if "docker compose run" in ln)
    words = []
    for ln in lines[start:]:
        words += shlex.split(ln.strip().lstrip("#").replace("\\", " "))
        if "--resume" in ln:
            break
    check_fedtune_args(words[words.index("coordinator") + 1:])
    kust = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert "--resume" in kust
    # the namespace exists before anything is created in it
    assert kust.index("namespace.yaml") < kust.index("create secret")


@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.site"])
def test_dockerfiles_take_the_cpu_build_of_torch(name: str):
    torch_line = next(x for x in _dockerfile(name) if x.startswith("RUN") and "torch==" in x)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line


def test_kubernetes_manifests():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = [d for f in kust["resources"] for d in yaml.safe_load_all(
        (DEPLOY / "k8s" / f).read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert {"Namespace", "PersistentVolumeClaim", "Service", "Job"} <= set(kinds)
    svc, job = kinds["Service"], kinds["Job"]
    assert svc["spec"]["ports"][0]["port"] == 9092
    pod = job["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    check_fedtune_args(container["args"])
    assert container["ports"][0]["name"] == svc["spec"]["ports"][0]["targetPort"]
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    for c in [*pod["spec"]["initContainers"], container]:
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
    claim = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"][
        "metadata"]["name"]


def test_docs_exist_and_name_the_commands():
    doc = (REPO / "docs" / "deployment.md").read_text()
    assert doc.startswith("# Cross-hospital deployment, step by step")
    for needle in ("fedtune certs init", "fedtune certs server", "fedtune certs site",
                   "fedtune server --config", "fedtune client --config", "--insecure",
                   "docker compose up", "systemctl", "kubectl apply -k deploy/k8s"):
        assert needle in doc, needle
    for ref in re.findall(r"deploy/[\w./-]+", doc):
        path = REPO / ref.rstrip(".")
        assert path.exists() or ref.startswith(("deploy/certs", "deploy/demo-data")), ref
