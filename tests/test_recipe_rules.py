"""Step-size rules that hold without tuning (common/recipe_checks.py, docs/privacy.md): a step's
gradient has norm <= C with DP off too (real MiniLM + PEFT LoRA), and the warnings a user sees
before a run about AdamW step sizes and FedAvgM's momentum ramp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client.trainer import train_local
from fedtune.common.config import DPConfig, LoraSettings, TrainConfig, load_config
from fedtune.common.data import EncodedDataset
from fedtune.common.lora import apply_lora, get_adapter, set_adapter
from fedtune.common.models import load_base_model
from fedtune.common.recipe_checks import momentum_ramp, recipe_warnings
from tests.test_length_chunks import _items


def test_dp_off_sgd_step_moves_the_adapter_by_at_most_lr_times_c():
    """A DP recipe's large SGD step size run with DP off: the step is bounded by lr x C, as
    under DP, instead of following the raw gradient (which made such runs blow up)."""
    base, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=4)
    model = apply_lora(base, "classification", LoraSettings(r=4, init_seed=3))
    data = EncodedDataset(_items(32, seed=2))
    start = get_adapter(model)
    lr, clip = 10.0, 0.05
    moved = {}
    for c in (clip, 1e6):  # 1e6: effectively no clipping, the raw gradient
        set_adapter(model, start)
        train_local(model, data, task="classification", pad_id=tok.pad_token_id,
                    device=torch.device("cpu"),
                    train=TrainConfig(batch_size=32, lr=lr, optimizer="sgd"),
                    dp=DPConfig(enabled=False, max_grad_norm=c), noise_multiplier=0.0,
                    steps=1, seed=0)
        moved[c] = float(np.sqrt(sum(float(np.sum((a - s) ** 2))
                                     for a, s in zip(get_adapter(model), start, strict=True))))
    set_adapter(model, start)
    assert moved[clip] <= lr * clip * (1 + 1e-4)
    assert moved[1e6] > 2 * lr * clip  # the raw gradient is larger: the clip did something


def test_adamw_step_size_far_above_its_range_is_warned_naming_the_key():
    warnings = recipe_warnings(load_config(None, ["train.head_lr=5"]))
    assert len(warnings) == 1 and warnings[0].startswith("train.head_lr = 5 with AdamW")
    assert recipe_warnings(load_config(None, [])) == []  # the defaults pass their own rules
    sgd = load_config(None, ["train.optimizer=sgd", "train.lr=0.05", "train.head_lr=10"])
    assert recipe_warnings(sgd) == []  # large steps are SGD's


@pytest.mark.parametrize(("rounds", "warned"), [(8, True), (48, False)])
def test_fedavgm_with_too_few_rounds_for_its_momentum_is_warned(rounds, warned):
    cfg = load_config(None, ["federation.strategy=fedavgm", f"federation.rounds={rounds}"])
    found = [w for w in recipe_warnings(cfg) if w.startswith("federation.strategy")]
    assert bool(found) == warned
    if warned:
        assert "36%" in found[0]  # sum_k (1 - 0.9^k) / 8
    assert momentum_ramp(0.9, 8) == pytest.approx(0.3593, abs=1e-4)
    assert momentum_ramp(0.0, 3) == 1.0


def test_auto_step_size_is_resolved_by_the_rule_and_kept_in_the_run_config(tmp_path):
    """`train.lr = "auto"` becomes 0.05 / sqrt(rounds x local steps) with DP, 0.05 / (rounds x
    local steps, at least 4) without (x (1 - beta) under FedAvgM); the saved config.toml keeps
    the number and says it came from the rule."""
    from fedtune.common.config import ConfigError, config_to_toml
    from fedtune.common.recipe_checks import train_line

    cfg = load_config(None, ["train.lr=auto", "federation.rounds=4", "train.local_steps=4"])
    assert cfg.train.lr == pytest.approx(0.05 / 4) and cfg.train.lr_rule == "auto"
    assert "auto: 0.05 / sqrt(4 rounds x 4 steps)" in train_line(cfg)
    saved = tmp_path / "config.toml"
    saved.write_text(config_to_toml(cfg))
    again = load_config(saved)
    assert again.train.lr == pytest.approx(cfg.train.lr) and again.train.lr_rule == "auto"
    longer = load_config(saved, ["federation.rounds=9"])  # the saved number no longer fits
    assert longer.train.lr == pytest.approx(cfg.train.lr) and longer.train.lr_rule == "fixed"
    momentum = load_config(None, ["train.lr=auto", "federation.strategy=fedavgm",
                                  "federation.rounds=25", "train.local_steps=1"])
    assert momentum.train.lr == pytest.approx(0.05 / 5 * 0.1)
    no_dp = load_config(None, ["train.lr=auto", "dp.enabled=false", "federation.rounds=4",
                               "train.local_steps=4"])
    assert no_dp.train.lr == pytest.approx(0.05 / 16)
    assert "auto: 0.05 / (4 rounds x 4 steps)" in train_line(no_dp)
    # Without DP a run shorter than 4 steps gets a 4-step run's step size (AdamW's first steps
    # are full-size sign steps); with DP the rule is not floored.
    short = load_config(None, ["train.lr=auto", "dp.enabled=false", "federation.rounds=2",
                               "train.local_steps=1"])
    assert short.train.lr == pytest.approx(0.05 / 4)
    assert "auto: 0.05 / (at least 4 steps)" in train_line(short)
    short_dp = load_config(None, ["train.lr=auto", "federation.rounds=2", "train.local_steps=1"])
    assert short_dp.train.lr == pytest.approx(0.05 / 2**0.5)
    with pytest.raises(ConfigError, match=r'train.lr = "auto" is a rule for AdamW'):
        load_config(None, ["train.lr=auto", "train.optimizer=sgd"])


def test_auto_step_size_keeps_the_noise_travel_per_weight_fixed_as_runs_get_longer():
    """The rule's premise, on the real trainer (MiniLM, PEFT LoRA, Opacus): under DP noise
    alone (sigma = 50, so the clipped signal is ~nothing), AdamW moves each weight by about
    lr x sqrt(T) over T steps. With the auto step size a 4x longer run ends about as far out
    (~0.05 per weight); with a fixed step size it ends about sqrt(4) = 2x further."""
    from fedtune.common.step_size import TRAVEL, auto_lr

    base, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=4)
    model = apply_lora(base, "classification", LoraSettings(r=4, init_seed=3))
    data = EncodedDataset(_items(64, seed=2))
    start = get_adapter(model)

    def travel(steps: int, lr: float) -> float:
        """RMS distance per weight after `steps` DP steps at step size `lr`."""
        set_adapter(model, start)
        train_local(model, data, task="classification", pad_id=tok.pad_token_id,
                    device=torch.device("cpu"), train=TrainConfig(batch_size=8, lr=lr),
                    dp=DPConfig(max_grad_norm=1.0), noise_multiplier=50.0, steps=steps,
                    seed=0)
        moved = get_adapter(model)
        n = sum(a.size for a in moved)
        return float(np.sqrt(sum(float(np.sum((a - s) ** 2))
                                 for a, s in zip(moved, start, strict=True)) / n))

    short, long = travel(4, auto_lr(1, 4)), travel(16, auto_lr(1, 16))
    fixed_long = travel(16, auto_lr(1, 4))
    set_adapter(model, start)
    assert 0.2 * TRAVEL < short < 2 * TRAVEL
    assert 0.7 < long / short < 1.4  # same travel, 4x the steps
    assert fixed_long / short > 1.5  # a fixed step size lets the noise walk sqrt(T) further
