"""Classification heads: how a sentence becomes one vector before the linear classifier.

Hugging Face's `AutoModelForSequenceClassification` classifies BERT-family encoders from the
[CLS] token through the pretrained pooler. Sentence-transformers models (the embedded
all-MiniLM-L6-v2 among them) were trained with *mean* pooling instead, and their [CLS] vector is
dominated by one direction shared by all sentences (|mean|^2 / E|x|^2 = 0.74 on Banking77, vs
0.21 for mean pooling, measured on Banking77's train.csv). Under DP-SGD that shared
direction eats most of each example's clipped gradient, so the head learns from the noise.
`MeanPoolingClassifier` uses the encoder as it was trained: masked mean of the last hidden
states, then one linear layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

Pooling = Literal["cls", "mean"]


def model_pooling(path: str) -> Pooling:
    """The pooling a model directory declares (sentence-transformers' 1_Pooling/config.json);
    "cls" (the Hugging Face head) when it declares none, or is a hub id."""
    config = Path(path) / "1_Pooling" / "config.json"
    try:
        declared = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if declared.get("pooling_mode_mean_tokens") else "cls"


class MeanPoolingClassifier(torch.nn.Module):
    """Encoder -> masked mean of the last hidden states -> linear classifier.

    The classifier is named `classifier`, like Hugging Face's heads, so that PEFT trains and
    saves it in full (modules_to_save) next to the LoRA matrices. Its initial weights are
    drawn from `seed` (normal(0, initializer_range), zero bias), identical everywhere.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        hidden = int(self.config.hidden_size)
        self.classifier = torch.nn.Linear(hidden, num_labels, dtype=encoder.dtype)
        gen = torch.Generator().manual_seed(seed)
        std = float(getattr(self.config, "initializer_range", 0.02))
        with torch.no_grad():
            w = torch.randn(num_labels, hidden, generator=gen, dtype=torch.float32) * std
            self.classifier.weight.copy_(w.to(self.classifier.weight.dtype))
            self.classifier.bias.zero_()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))
