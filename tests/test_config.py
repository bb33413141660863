from pathlib import Path

import pytest

from fedtune.common.config import ConfigError, RunConfig, load_config
from tests.conftest import run_fedtune


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.federation.num_sites == 3 and cfg.federation.rounds == 2
    assert cfg.dp.enabled


def test_toml_file_and_overrides(tmp_path: Path):
    f = tmp_path / "run.toml"
    f.write_text('[dp]\ntarget_epsilon = 4.0\n[federation]\nnum_sites = 5\n')
    cfg = load_config(f, ["dp.target_epsilon=3", "lora.target_modules=['q_proj']"])
    assert cfg.dp.target_epsilon == 3.0
    assert cfg.federation.num_sites == 5
    assert cfg.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("lora.rank=4", "lora.rank", "unknown key"),
        ("dp.target_epsilon=abc", "dp.target_epsilon", "number"),
        ("lora.r=0", "lora.r", "greater than 0"),
        ("dp.delta=1.5", "dp.delta", "less than 1"),
        ("federation.min_fit_sites=9", "federation", "min_fit_sites"),
        ("nosuchsection.x=1", "nosuchsection", "unknown key"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str, words: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)
    assert words in str(e.value)


def test_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nr = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[lora]\nrnk = 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(unknown)
    assert "unknown.toml" in str(e.value) and "lora.rnk" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_config_show_cli_prints_effective_config():
    res = run_fedtune("config", "show", "--set", "dp.target_epsilon=3", "--set", "lora.r=4")
    assert res.returncode == 0, res.stderr
    assert "target_epsilon = 3.0" in res.stdout
    assert "r = 4" in res.stdout
    # What it prints is itself a valid config.
    import tomllib

    data = tomllib.loads(res.stdout)
    assert RunConfig.model_validate(data).lora.r == 4
    # An unset key is shown with what it means: whether SecAgg+ is on is never left implicit.
    assert "# secagg: not set (SecAgg+ off in `fedtune simulate`, on in `fedtune server`)" \
        in res.stdout
    on = run_fedtune("config", "show", "--set", "federation.secagg=true")
    assert "secagg = true" in on.stdout


def test_cli_rejects_bad_key_with_exit_code_2():
    res = run_fedtune("simulate", "--set", "lora.r=-1")
    assert res.returncode == 2
    assert "lora.r" in res.stderr
