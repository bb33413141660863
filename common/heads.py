"""Classification heads: how a sentence becomes one vector before the linear classifier.

Hugging Face's `AutoModelForSequenceClassification` classifies BERT-family encoders from the
[CLS] token through the pretrained pooler. Sentence-transformers models (the embedded
all-MiniLM-L6-v2 among them) were trained with *mean* pooling instead, and their [CLS] vector is
dominated by one direction shared by all sentences (|mean|^2 / E|x|^2 = 0.74 on Banking77, vs
0.21 for mean pooling, measured on Banking77's train.csv). Under DP-SGD that shared
direction eats most of each example's clipped gradient, so the head learns from the noise.
`MeanPoolingClassifier` uses the encoder as it was trained: masked mean of the last hidden
states (L2-normalised when the model declares a Normalize module, as all-MiniLM-L6-v2 does),
then one linear layer.

The classifier can start from the label names instead of random weights (`init_from_label_names`):
row k is the sentence vector of label k's name ("card_arrival" -> "card arrival"), so the
untrained model already classifies by cosine similarity to the label names (zero-shot with
all-MiniLM-L6-v2 on Banking77's test set, measured: 0.62 accuracy on 1,000 random queries,
0.598 on the benchmark's stratified 500). Label names are part of the
shared configuration, not site data, so this costs no privacy budget; under DP it saves the
noisy steps a random head spends to find the classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

Pooling = Literal["cls", "mean"]
# Logit scale of a label-name head: logits = scale x cosine(sentence, label name). 20 gave the
# lowest zero-shot cross-entropy on Banking77 of 5/10/20/30/50 (1.49 at 20; 1.68 at 10, 1.78
# at 30), i.e. the temperature 0.05 common for cosine-softmax classifiers. It is a fixed factor
# outside the weights (unit rows): in the weights (rows of norm 20) each Adam step moved the
# head 20x less relative to its size, and federated Banking77 reached 0.784 accuracy without DP
# (0.650 at epsilon 8) instead of 0.856 (0.676) with the factor outside, same runs otherwise.
LABEL_NAME_SCALE = 20.0


def model_pooling(path: str) -> Pooling:
    """The pooling a model directory declares (sentence-transformers' 1_Pooling/config.json);
    "cls" (the Hugging Face head) when it declares none, or is a hub id."""
    config = Path(path) / "1_Pooling" / "config.json"
    try:
        declared = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if declared.get("pooling_mode_mean_tokens") else "cls"


def model_normalizes(path: str) -> bool:
    """Whether a sentence-transformers model ends with a Normalize module (modules.json)."""
    try:
        modules = json.loads((Path(path) / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(m.get("type", "")).endswith(".Normalize") for m in modules
               if isinstance(m, dict))


def label_text(label: str) -> str:
    """The words of a label name: "card_arrival" -> "card arrival"."""
    return " ".join(re.split(r"[_\-\s]+", str(label))).strip()


def labels_have_names(labels: list[str]) -> bool:
    """True when every label contains a letter (names, not codes such as "0" or "17")."""
    return bool(labels) and all(re.search(r"[^\W\d_]", str(x)) for x in labels)


def starts_from_label_names(head_init: str, labels: list[str] | None) -> bool:
    """Whether a mean-pooling head starts from the label names (`task.head_init`)."""
    return head_init == "label_names" or (head_init == "auto" and labels_have_names(labels or []))


class MeanPoolingClassifier(torch.nn.Module):
    """Encoder -> masked mean of the last hidden states -> linear classifier.

    The classifier is named `classifier`, like Hugging Face's heads, so that PEFT trains and
    saves it in full (modules_to_save) next to the LoRA matrices. Its initial weights are
    drawn from `seed` (normal(0, initializer_range), zero bias), identical everywhere.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int, seed: int = 0,
                 normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize
        self.config = encoder.config
        self.config.num_labels = num_labels
        hidden = int(self.config.hidden_size)
        self.classifier = torch.nn.Linear(hidden, num_labels, dtype=encoder.dtype)
        # Fixed factor on the logits (1 for a random head; init_from_label_names sets it).
        # Rebuilt from the configuration, not saved with the adapter.
        self.register_buffer("logit_scale", torch.ones((), dtype=encoder.dtype),
                             persistent=False)
        gen = torch.Generator().manual_seed(seed)
        std = float(getattr(self.config, "initializer_range", 0.02))
        with torch.no_grad():
            w = torch.randn(num_labels, hidden, generator=gen, dtype=torch.float32) * std
            self.classifier.weight.copy_(w.to(self.classifier.weight.dtype))
            self.classifier.bias.zero_()

    def get_input_embeddings(self) -> torch.nn.Module:
        """The encoder's token embeddings (what Hugging Face tools expect of a model)."""
        return self.encoder.get_input_embeddings()

    def sentence_vector(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None, **_: object
    ) -> SequenceClassifierOutput:
        """Logits; with `labels` also their mean cross-entropy, as Hugging Face's heads return
        it (what the Trainer reads). fedtune's own loss is per example (common/tasks.py)."""
        vector = self.sentence_vector(input_ids, attention_mask)
        logits = self.logit_scale * self.classifier(vector)
        loss = (None if labels is None
                else torch.nn.functional.cross_entropy(logits.float(), labels))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def init_from_label_names(self, tokenizer, labels: list[str], max_length: int = 32,
                              scale: float = LABEL_NAME_SCALE) -> None:
        """Classifier row k = the unit sentence vector of label k's name, bias 0, and the
        logits multiplied by `scale`: logits = scale x cosine(sentence, label name)."""
        if len(labels) != self.classifier.out_features:
            raise ValueError(f"{len(labels)} label names for {self.classifier.out_features} "
                             "classes")
        was_training = self.training
        self.eval()  # no dropout in the label vectors
        batch = tokenizer([label_text(x) for x in labels], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        device = self.classifier.weight.device
        vectors = self.sentence_vector(batch["input_ids"].to(device),
                                       batch["attention_mask"].to(device))
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        self.classifier.weight.copy_(vectors.to(self.classifier.weight.dtype))
        self.classifier.bias.zero_()
        self.logit_scale.fill_(scale)
        self.train(was_training)
