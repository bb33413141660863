"""Person-level (user-level) DP-SGD: Poisson sampling over persons, one clipped gradient each.

With `data.privacy_unit = <column>` the unit of privacy is a person (a patient, a customer): all
records sharing a value of that column. This is user-level DP-SGD with user-level sampling
("ULS") of Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla & Rush, "Fine-Tuning Large
Language Models with User-Level Differential Privacy" (2024):

- **Sampling over persons.** Opacus' Poisson sampler (`UniformWithReplacementSampler`, the site's
  secret generator, client/randomness.py) runs over a dataset of *persons*: each person joins a
  step independently with probability q = 1 / ceil(persons / batch_size), so `train.batch_size`
  is the expected number of persons per batch. A sampled person brings all of their records, or
  at most `data.max_records_per_person` of them, drawn uniformly without replacement afresh at
  every step with the same secret generator (the contribution bound of Charles et al.).
- **One clipped gradient per person.** The per-example gradients (client/linear_grad_sample.py,
  or Opacus' hooks) of a person's records are averaged into one per-person row (index_add by
  person, in float32, then divided by the person's record count in the step) before Opacus'
  clipping sees them, so `Fp32ClipDPOptimizer` clips each *person's* gradient to C, in float32,
  and adds N(0, σ²C²) to the sum over persons. Adding or removing a person changes the clipped
  sum by at most C: the sensitivity the noise is calibrated for.
- **Accounting over persons.** The same Poisson-subsampled Gaussian mechanism, with q over
  persons and the same steps: ε(σ, q, steps, δ) per person, with δ < 1/persons.

The mean (not the sum) of a person's gradients keeps a person's gradient on the scale of one
record's, so clipping to C bites as at record level; with one record per person the mechanism,
q, σ and ε are exactly the record-level ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.common.data import EncodedDataset, PadCollator, person_groups

PERSON_KEY = "person"  # batch key: the batch position of each row's person


class PersonIndex(torch.utils.data.Dataset):
    """A dataset of persons (item i = person i): what Opacus' Poisson sampler runs over."""

    def __init__(self, persons: int) -> None:
        self.persons = persons

    def __len__(self) -> int:
        return self.persons

    def __getitem__(self, i: int) -> tuple[int]:
        return (i,)  # a tuple: Opacus' DPDataLoader iterates an item to shape empty batches


class PersonCollator:
    """Sampled persons -> one padded batch of their records, with `batch["person"]` naming each
    row's person (0 .. persons in the batch - 1). A person's records are all there together."""

    def __init__(self, dataset: EncodedDataset, groups: Sequence[Sequence[int]], pad_id: int,
                 max_records: int | None, generator: torch.Generator) -> None:
        self.dataset, self.groups = dataset, groups
        self.pad = PadCollator(pad_id)
        self.max_records, self.generator = max_records, generator

    def records_of(self, person: int) -> list[int]:
        """The records of `person` that enter this step: all, or `max_records` of them drawn
        uniformly without replacement with the site's secret generator."""
        rows = list(self.groups[person])
        if self.max_records is not None and len(rows) > self.max_records:
            pick = torch.randperm(len(rows), generator=self.generator)[: self.max_records]
            rows = [rows[i] for i in sorted(pick.tolist())]
        return rows

    def __call__(self, persons: list[tuple[int]]) -> dict[str, torch.Tensor]:
        rows, owner = [], []
        for slot, (person,) in enumerate(persons):
            for i in self.records_of(int(person)):
                rows.append(i)
                owner.append(slot)
        fetch = getattr(self.dataset, "__getitems__", None)  # one fetch per batch, as torch's
        items = ([] if not rows else fetch(rows) if fetch is not None
                 else [self.dataset[i] for i in rows])
        batch = self.pad(items)
        batch[PERSON_KEY] = torch.tensor(owner, dtype=torch.long)
        return batch


def site_person_groups(dataset: EncodedDataset) -> list[list[int]]:
    """Record indices per person of a site's dataset (which must carry its person ids)."""
    if dataset.persons is None:
        raise ValueError("a person-level run needs the person of every record "
                         "(data.privacy_unit); this dataset has none")
    return person_groups(dataset.persons)


def _flat(grad_sample: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(grad_sample, dim=0) if isinstance(grad_sample, list) else grad_sample


def group_grad_samples(params: Sequence[torch.nn.Parameter], owner: torch.Tensor, persons: int,
                       sums: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Add one pass's per-example gradients (`p.grad_sample`, one row per record) into per-person
    float32 sums (one row per person of the batch: index_add by `owner`) and free them.

    Called after every pass of a batch, so that a person's records may sit in different
    length chunks: nothing is clipped until the batch's persons are complete."""
    out = []
    for k, p in enumerate(params):
        rows = _flat(p.grad_sample)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        acc = (sums[k] if sums is not None else
               torch.zeros((persons, *rows.shape[1:]), dtype=rows.dtype, device=rows.device))
        out.append(acc.index_add_(0, owner.to(rows.device), rows))
        p.grad_sample = None
    return out


def set_person_grad_samples(params: Sequence[torch.nn.Parameter], sums: list[torch.Tensor],
                            owner: torch.Tensor, persons: int) -> None:
    """Each person's mean gradient as the per-sample gradient Opacus clips (float32)."""
    counts = torch.bincount(owner, minlength=persons).clamp(min=1)
    for p, acc in zip(params, sums, strict=True):
        scale = counts.to(acc).reshape(-1, *([1] * (acc.dim() - 1)))
        p.grad_sample = acc / scale
