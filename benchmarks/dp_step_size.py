"""Choose the DP-SGD step size of a classification head on a validation split, cheaply.

Under DP-SGD every per-example gradient is clipped to norm C and Gaussian noise of std sigma*C is
added to their sum, so the best step size falls as sigma grows (smaller epsilon, fewer records):
one step size for every epsilon either wastes epsilon 8 or drowns epsilon 1 in noise. DP papers
tune it per epsilon (e.g. Li et al., ICLR 2022, "Large Language Models Can Be Strong
Differentially Private Learners"); the benchmark does so here, scoring on records that none of
its reported numbers use. The trial runs train on the banks' records, so (as in those papers)
the choice is not covered by the sites' epsilon; Papernot & Steinke (ICLR 2022) show how to
account for it.

The search runs a proxy, not the benchmark's runs: the head alone on the frozen encoder's sentence
vectors (LoRA starts at B = 0, so the encoder is the base model's), trained by the same mechanism
(Poisson sampling at q = 1 / ceil(records / batch), per-example clipping, noise calibrated by
`common.privacy.calibrate_noise` for all of a bank's steps, FedAvg weighted by records). Its
per-example gradients are closed-form (softmax error x sentence vector), so a whole federated run
takes a fraction of a second instead of minutes. Under DP the LoRA matrices' gradients are ~18x
smaller than the head's (measured at init), so the head is what the noise budget buys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.client.trainer import poisson_sample_rate
from fedtune.common.privacy import calibrate_noise


@dataclass(frozen=True)
class Features:
    """Sentence vectors and labels of one set of records."""

    x: torch.Tensor  # (n, hidden)
    y: torch.Tensor  # (n,)


@torch.no_grad()
def sentence_features(model: torch.nn.Module, data, pad_id: int, batch_size: int = 128
                      ) -> Features:
    """The vectors a MeanPoolingClassifier's head sees, for every record of `data` (eval mode)."""
    from fedtune.common.data import PadCollator

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = base.training
    base.eval()
    xs, ys = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size,
                                         collate_fn=PadCollator(pad_id))
    for batch in loader:
        xs.append(base.sentence_vector(batch["input_ids"], batch["attention_mask"]).float())
        ys.append(batch["labels"])
    base.train(was_training)
    return Features(torch.cat(xs), torch.cat(ys))


@dataclass(frozen=True)
class Head:
    """The classifier's start: logits = scale * (x @ weight.T + bias)."""

    weight: torch.Tensor
    bias: torch.Tensor
    scale: float

    def accuracy(self, f: Features) -> float:
        logits = self.scale * (f.x @ self.weight.T + self.bias)
        return float((logits.argmax(1) == f.y).float().mean())


def head_of(model: torch.nn.Module) -> Head:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linear = base.classifier.modules_to_save["default"] if hasattr(
        base.classifier, "modules_to_save") else base.classifier
    return Head(linear.weight.detach().float().clone(), linear.bias.detach().float().clone(),
                float(base.logit_scale))


def dp_fedavg_head(head: Head, banks: Sequence[Features], *, rounds: int, local_steps: int,
                   batch_size: int, lr: float, epsilon: float | None, delta: float, clip: float,
                   seed: int, accountant: str = "rdp", server_momentum: float = 0.0) -> Head:
    """Federated DP-SGD (plain SGD at each bank) of the head alone; one bank = centralized.
    epsilon None: the same with noise 0 (clipping kept), a non-private reference.
    server_momentum: FedAvgM's (server/strategy/fedavgm.py) buffer m = beta m + mean delta, the
    head moved by m (server step size 1); 0 is FedAvg."""
    gen = torch.Generator().manual_seed(seed)
    w, b = head.weight.clone(), head.bias.clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    steps = rounds * local_steps
    for _ in range(rounds):
        sum_w, sum_b, total = torch.zeros_like(w), torch.zeros_like(b), 0
        for bank in banks:
            n = len(bank.y)
            q = poisson_sample_rate(n, batch_size)  # what the sites account
            sigma = (0.0 if epsilon is None
                     else calibrate_noise(epsilon, delta, q, steps, accountant))
            lw, lb = w.clone(), b.clone()
            for _ in range(local_steps):
                pick = (torch.rand(n, generator=gen) < q).nonzero().squeeze(1)
                x, y = bank.x[pick], bank.y[pick]
                err = torch.softmax(head.scale * (x @ lw.T + lb), dim=1)
                err[torch.arange(len(y)), y] -= 1.0
                err *= head.scale  # d loss / d (x @ w.T + b), one row per example
                norms = err.norm(dim=1) * torch.sqrt((x * x).sum(1) + 1.0)
                err *= (clip / norms.clamp(min=1e-12)).clamp(max=1.0)[:, None]
                gw = err.T @ x + torch.randn(lw.shape, generator=gen) * sigma * clip
                gb = err.sum(0) + torch.randn(lb.shape, generator=gen) * sigma * clip
                lw -= lr * gw / (q * n)
                lb -= lr * gb / (q * n)
            sum_w += n * (lw - w)
            sum_b += n * (lb - b)
            total += n
        mw = server_momentum * mw + sum_w / total
        mb = server_momentum * mb + sum_b / total
        w += mw
        b += mb
    return Head(w, b, head.scale)


def choose_lr(head: Head, banks: Sequence[Features], validation: Features, *,
              candidates: Sequence[float], seeds: int = 3,
              **run) -> tuple[float, dict[float, float]]:
    """The candidate step size with the best mean validation accuracy over `seeds` runs, and
    every candidate's mean accuracy."""
    scores = {lr: sum(dp_fedavg_head(head, banks, lr=lr, seed=s, **run).accuracy(validation)
                      for s in range(seeds)) / seeds for lr in candidates}
    return max(scores, key=lambda lr: scores[lr]), scores
