"""Local training at a site: LoRA parameters only, with Opacus DP-SGD or (for comparison) without.

DP-SGD here is the textbook mechanism (Abadi et al., 2016) as Opacus implements it:
Poisson-sampled batches at rate q = batch_size / records, each example's gradient clipped to
L2 norm <= C, Gaussian noise N(0, (sigma C)^2) added to the sum, divided by the expected batch size.
With a person-level privacy unit (`data.privacy_unit = <column>`) the same mechanism runs over
persons instead of records: user-level DP-SGD with user-level sampling (Charles et al. 2024,
"Fine-Tuning Large Language Models with User-Level Differential Privacy";
client/person_sampling.py).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer

from fedtune.client.fp32_clip import Fp32ClipDPOptimizer
from fedtune.client.linear_grad_sample import linear_grad_samples, trainable_linears
from fedtune.client.person_sampling import (
    PERSON_KEY,
    PersonCollator,
    PersonIndex,
    group_grad_samples,
    set_person_grad_samples,
    site_person_groups,
)
from fedtune.client.randomness import SiteRandomness, site_randomness
from fedtune.common.config import DPConfig, TrainConfig
from fedtune.common.data import EncodedDataset, PadCollator, length_chunks
from fedtune.common.models import TaskKind
from fedtune.common.tasks import per_sample_loss

if TYPE_CHECKING:
    from fedtune.client.canaries import GradientCanaries


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int  # examples actually sampled across all steps
    empty_steps: int  # Poisson batches with no example (noise-only DP steps)
    sample_rate: float  # q used for accounting (0 without DP)
    secret_randomness: bool  # sampler and noise from OS entropy (False: from a given seed)
    persons_seen: int = 0  # person-level: persons sampled across all steps (0 at record level)


def poisson_sample_rate(records: int, batch_size: int) -> float:
    """The sample rate Opacus derives for a loader of this size (1 / batches per epoch)."""
    return 1.0 / math.ceil(records / min(batch_size, records))


def is_head(name: str) -> bool:
    """Whether a trainable parameter belongs to a head trained in full (PEFT modules_to_save)."""
    return ".modules_to_save." in name


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig
               ) -> torch.optim.Optimizer:
    """SGD or AdamW, with the head in its own parameter group when `head_lr` is set."""
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    groups = [{"params": [p for n, p in named if is_head(n) == head], "lr": lr}
              for head, lr in ((False, cfg.lr), (True, head_lr))]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batches(loader: torch.utils.data.DataLoader, steps: int):
    """`steps` batches, restarting the loader as often as needed."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    anchor: list[torch.Tensor] | None,
    mu: float,
) -> None:
    """One optimizer step, then FedProx's proximal step -lr*mu*(w_before - w_global), with the
    step size lr of each parameter's group."""
    if anchor is None:
        optimizer.step()
        return
    with torch.no_grad():
        gaps = [p.detach() - a for p, a in zip(params, anchor, strict=True)]
    optimizer.step()
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for p, g in zip(params, gaps, strict=True):
            p.sub_(g, alpha=lrs[id(p)] * mu)


def _clip_into_sum(optimizer: DPOptimizer) -> None:
    """Clip one pass's per-example gradients into Opacus' running sum of clipped gradients and
    free them; the batch's last pass then takes the one noised step.

    Each example is in exactly one pass (length_chunks), so this is the same DP step as one
    pass over the whole Poisson batch. It is the mechanism of Opacus' BatchMemoryManager: a
    skipped step only clips and accumulates. Clipping pass by pass keeps the per-example
    gradients of one pass in memory (not the batch's), and nothing is concatenated.
    """
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # after a skipped step it keeps the clipped sum


def _backward(loss: torch.Tensor, n: int, dp: bool, own_grad_samples: bool) -> None:
    """Back-propagate one pass's per-example losses so that each path gets what it expects.

    Without DP: the batch's mean loss. With Opacus' hooks: the pass's own mean (they rescale a
    pass's per-example gradients by its size). With linear_grad_sample: the sum, whose gradient
    w.r.t. example i's output is example i's gradient. Under DP, Opacus divides the clipped,
    noised sum by the expected batch size itself.
    """
    if not dp:
        loss = loss.sum() / n
    elif own_grad_samples:
        loss = loss.sum()
    else:
        loss = loss.mean()
    loss.backward()


def train_local(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    *,
    task: TaskKind,
    pad_id: int,
    device: torch.device,
    train: TrainConfig,
    dp: DPConfig,
    noise_multiplier: float,
    steps: int,
    seed: int | None = None,
    proximal_mu: float = 0.0,
    grad_sample_mode: Literal["auto", "hooks"] = "auto",
    canaries: GradientCanaries | None = None,
    person_level: bool = False,
    max_records_per_person: int | None = None,
) -> TrainResult:
    """Run `steps` optimizer steps on the trainable (LoRA) parameters of `model`, in place.

    `proximal_mu` > 0 adds FedProx's term mu/2 ||w - w_global||^2 (Li et al., MLSys 2020),
    w_global = the global adapter on entry, applied after each optimizer step (`_step`); it does
    not touch the data, so under DP it is post-processing with no privacy cost.

    Under DP, per-example gradients come from client/linear_grad_sample.py when every trainable
    tensor belongs to an nn.Linear (LoRA, a linear head: the usual case), else from Opacus'
    hooks; `grad_sample_mode="hooks"` forces the hooks (to compare the two). Clipping and the
    clipped sum are float32 whatever the model's dtype (client/fp32_clip.py).

    `seed` None (the default): the Poisson sampler and the noise draw from OS entropy, so nobody
    else can know the batches or the noise. An int makes the round reproducible, and known to
    whoever knows it (tests, benchmarks, `dp.reproducible_seed`; client/randomness.py).

    `canaries` (an auditor site, client/canaries.py): under DP, each step first clips the
    gradients of the canaries its Poisson sample takes into the step's sum, then the batch's.

    `person_level` (data.privacy_unit = <column>; `dataset.persons` names each record's person):
    Poisson sampling over persons (q = 1 / ceil(persons / batch_size)), and each sampled
    person's records (at most `max_records_per_person`, drawn with the secret generator) give
    one gradient, their mean, clipped to C: user-level DP-SGD (client/person_sampling.py).
    """
    if grad_sample_mode not in ("auto", "hooks"):
        raise ValueError(f"grad_sample_mode must be 'auto' or 'hooks', not {grad_sample_mode!r}")
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = _optimizer(named, train)
    rng = site_randomness(seed, device)
    loader, collate = _site_loader(dataset, train, pad_id, rng, person_level,
                                   max_records_per_person)
    sample_rate = 0.0
    module: torch.nn.Module = model
    linears = trainable_linears(model) if dp.enabled and grad_sample_mode == "auto" else None
    if dp.enabled:
        module, optimizer, loader = _make_private(model, optimizer, loader, collate, dp=dp,
                                                  noise_multiplier=noise_multiplier, rng=rng,
                                                  own_grad_samples=linears is not None)
        sample_rate = float(loader.sample_rate)
    # Opacus' no_op wrapper only forwards to the model (with a positional input): run the model.
    net = module if linears is None else model
    losses: list[float] = []
    seen = empty = persons_seen = 0
    restore = contextlib.ExitStack()
    try:
        if linears is not None:
            restore.enter_context(linear_grad_samples(linears))
        for batch in _batches(loader, steps):
            optimizer.zero_grad(set_to_none=True)
            if canaries is not None and dp.enabled:
                _clip_canaries_into_sum(canaries, optimizer, params, sample_rate, dp)
            n = int(batch["input_ids"].shape[0])
            if n == 0:
                empty += 1
                # An empty Poisson batch is still a DP step: the update is pure noise.
                for p in params:
                    p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
                _step(optimizer, params, anchor, proximal_mu)
                continue
            total, persons = _backward_batch(batch, net, optimizer, params, task=task,
                                             device=device, train=train, dp=dp.enabled,
                                             own_grad_samples=linears is not None)
            persons_seen += persons
            if not dp.enabled:
                # The step's gradient has norm <= C with DP off too (under DP, the mean of
                # clipped per-example gradients does), so a recipe's step sizes keep their
                # meaning when DP is switched off instead of blowing up on raw gradients.
                torch.nn.utils.clip_grad_norm_(params, dp.max_grad_norm)
            _step(optimizer, params, anchor, proximal_mu)
            losses.append(total / n)
            seen += n
    finally:
        restore.close()  # the layers' own forward again
        if dp.enabled:
            module._close()  # remove Opacus hooks: the model is reused next round
            for p in params:  # also when a step broke off after a chunk was clipped
                p.grad_sample = p.summed_grad = None
            optimizer.zero_grad(set_to_none=True)
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return TrainResult(mean_loss, steps, seen, empty, sample_rate, rng.secret, persons_seen)


def _site_loader(
    dataset: EncodedDataset, train: TrainConfig, pad_id: int, rng: SiteRandomness,
    person_level: bool, max_records_per_person: int | None,
) -> tuple[torch.utils.data.DataLoader, PadCollator | PersonCollator]:
    """The site's loader over records, or over persons (its collator then brings each sampled
    person's records). Its generator is the site's sampler: Opacus' Poisson sampler takes it."""
    collate: PadCollator | PersonCollator = PadCollator(pad_id)
    units: torch.utils.data.Dataset = dataset
    if person_level:
        groups = site_person_groups(dataset)
        units = PersonIndex(len(groups))
        collate = PersonCollator(dataset, groups, pad_id, max_records_per_person, rng.sampler)
    loader = torch.utils.data.DataLoader(
        units, batch_size=min(train.batch_size, len(units)), shuffle=True, collate_fn=collate,
        generator=rng.sampler,
    )
    return loader, collate


def _make_private(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader, collate: PadCollator | PersonCollator, *,
    dp: DPConfig, noise_multiplier: float, rng: SiteRandomness, own_grad_samples: bool,
) -> tuple[torch.nn.Module, DPOptimizer, torch.utils.data.DataLoader]:
    """Opacus' DP-SGD (Poisson sampling, clipping, noise) with the site's own generators and
    float32 clipping."""
    engine = PrivacyEngine(accountant=dp.accountant)
    with warnings.catch_warnings():
        # Opacus warns about the secure RNG; fedtune documents that choice (docs/privacy.md).
        warnings.simplefilter("ignore")
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=rng.noise,
            # "no_op": Opacus' mode for per-example gradients computed outside its hooks.
            grad_sample_mode="no_op" if own_grad_samples else "hooks",
        )
    if loader.batch_sampler.generator is not rng.sampler:
        raise RuntimeError("Opacus' Poisson sampler does not use the site's generator")
    # Per-example norms, clip factors and the clipped sum in float32 (bf16 models too).
    optimizer = Fp32ClipDPOptimizer.replacing(optimizer, rng.noise)
    # Opacus' empty-batch wrapper cannot build an empty batch of dicts when the *first* Poisson
    # batch is empty; fedtune's collators build empty batches themselves.
    loader.collate_fn = collate
    return module, optimizer, loader


def _backward_batch(
    batch: dict[str, torch.Tensor], net: torch.nn.Module, optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter], *, task: TaskKind, device: torch.device,
    train: TrainConfig, dp: bool, own_grad_samples: bool,
) -> tuple[float, int]:
    """Forward and backward one Poisson batch as passes of similar-length examples; under DP
    each pass is clipped into the step's sum (person-level: once a person's records are all in).
    Returns the batch's summed loss and its number of persons (0 at record level)."""
    owner = batch.get(PERSON_KEY)  # person-level: each row's person in the batch
    n = int(batch["input_ids"].shape[0])
    by_person = dp and owner is not None
    persons = int(owner.max()) + 1 if owner is not None else 0
    sums: list[torch.Tensor] | None = None
    total = 0.0
    chunks = length_chunks(batch, train.chunk_tokens)  # PERSON_KEY splits with its rows
    for i, chunk in enumerate(chunks):
        rows_owner = chunk.pop(PERSON_KEY, None)
        chunk = {k: v.to(device) for k, v in chunk.items()}
        loss = per_sample_loss(net, chunk, task)
        _backward(loss, n, dp, own_grad_samples)
        total += float(loss.detach().sum())
        if by_person:  # a person's records may span chunks: clip once all are in
            sums = group_grad_samples(params, rows_owner, persons, sums)
        elif dp and i < len(chunks) - 1:
            _clip_into_sum(optimizer)
    if by_person:
        assert sums is not None and owner is not None
        set_person_grad_samples(params, sums, owner.to(sums[0].device), persons)
    return total, persons


def _clip_canaries_into_sum(canaries: GradientCanaries, optimizer: DPOptimizer,
                            params: list[torch.nn.Parameter], sample_rate: float,
                            dp: DPConfig) -> None:
    """An auditor site: the canaries this step's Poisson sample takes, clipped into its sum."""
    for rows in canaries.step_passes(params, sample_rate, dp.max_grad_norm):
        for p, g in zip(params, rows, strict=True):
            p.grad_sample = g
        _clip_into_sum(optimizer)
