"""Classification heads: the sentence vector a model was trained with (common/heads.py)."""

import json

import pytest
import torch

from fedtune.common.config import LoraSettings
from fedtune.common.data import PadCollator
from fedtune.common.heads import (
    MeanPoolingClassifier,
    label_text,
    labels_have_names,
    model_normalizes,
    model_pooling,
)
from fedtune.common.lora import apply_lora
from fedtune.common.models import ModelLoadError, load_base_model, resolve_model_path


def test_declared_pooling_is_read_from_the_model_directory(tmp_path):
    assert model_pooling(resolve_model_path("all-minilm-l6-v2")) == "mean"
    assert model_pooling(str(tmp_path)) == "cls"  # no sentence-transformers config
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert model_pooling(str(tmp_path)) == "cls"
    assert model_pooling("some-org/some-hub-model") == "cls"


@pytest.fixture(scope="module")
def mean_model():
    base, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5)
    return base, tok


def test_auto_pooling_builds_the_mean_pooling_head_with_a_seeded_classifier(mean_model):
    base, _ = mean_model
    assert isinstance(base, MeanPoolingClassifier)
    again, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5)
    assert torch.equal(base.classifier.weight, again.classifier.weight)
    other, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                                  head_seed=1)
    assert not torch.equal(base.classifier.weight, other.classifier.weight)
    cls, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                                pooling="cls")
    assert not isinstance(cls, MeanPoolingClassifier)  # Hugging Face's [CLS] + pooler head


def test_padding_does_not_change_the_sentence_vector(mean_model):
    base, tok = mean_model
    base.eval()
    short = tok("I lost my card")["input_ids"]
    long = tok("why was my transfer to a friend abroad declined twice today")["input_ids"]
    alone = PadCollator(tok.pad_token_id)([{"input_ids": short, "labels": 0}])
    padded = PadCollator(tok.pad_token_id)(
        [{"input_ids": short, "labels": 0}, {"input_ids": long, "labels": 1}])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        a = base(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        b = base(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)


def test_peft_trains_and_saves_lora_and_the_full_classifier(mean_model, tmp_path):
    base, _ = mean_model
    model = apply_lora(base, "classification", LoraSettings(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert not any("encoder.embeddings" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("classifier.weight") for k in saved)


BANK_LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top-up failed",
               "cash_withdrawal"]


def test_label_names_are_words_and_codes_are_not(tmp_path):
    assert label_text("lost_or_stolen_card") == "lost or stolen card"
    assert label_text("top-up failed") == "top up failed"
    assert labels_have_names(BANK_LABELS)
    assert not labels_have_names(["0", "1", "17"]) and not labels_have_names([])
    assert model_normalizes(resolve_model_path("all-minilm-l6-v2"))  # 2_Normalize in modules.json
    assert not model_normalizes(str(tmp_path))


def test_label_name_head_classifies_zero_shot_before_any_training():
    model, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                                    labels=BANK_LABELS)  # head_init "auto": names -> label_names
    model.eval()
    queries = {"My new card still has not arrived": 0,
               "What exchange rate do you use for euros?": 1,
               "Someone stole my card": 2,
               "Why did my top up not work?": 3,
               "How do I withdraw cash at an ATM?": 4}
    batch = tok(list(queries), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.argmax(-1).tolist() == list(queries.values())
    rows = model.classifier.weight.norm(dim=-1)  # unit rows; the scale is a fixed factor
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert float(model.logit_scale) == 20.0 and logits.abs().max() <= 20.0 + 1e-4
    # Numeric codes carry no meaning: "auto" keeps the seeded random head.
    coded, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                                  labels=["0", "1", "2", "3", "4"])
    random_head, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5)
    assert torch.equal(coded.classifier.weight, random_head.classifier.weight)
    forced, _, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                                   labels=BANK_LABELS, head_init="random")
    assert torch.equal(forced.classifier.weight, random_head.classifier.weight)


def test_label_name_head_needs_mean_pooling_and_labels():
    with pytest.raises(ModelLoadError, match="head_init"):
        load_base_model("all-minilm-l6-v2", "classification", num_labels=5, labels=BANK_LABELS,
                        pooling="cls", head_init="label_names")
    with pytest.raises(ModelLoadError, match="data.labels"):
        load_base_model("all-minilm-l6-v2", "classification", num_labels=5,
                        head_init="label_names")


def test_mean_pooling_head_returns_the_loss_hugging_face_tools_expect(mean_model):
    """With labels the head returns their mean cross-entropy (what transformers.Trainer reads),
    and exposes the encoder's input embeddings."""
    base, tok = mean_model
    base.eval()
    batch = PadCollator(tok.pad_token_id)([{"input_ids": tok(t)["input_ids"], "labels": i}
                                           for i, t in enumerate(["lost card", "top up"])])
    with torch.no_grad():
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"])
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert plain.loss is None
    want = torch.nn.functional.cross_entropy(plain.logits, batch["labels"])
    torch.testing.assert_close(out.loss, want)
    assert base.get_input_embeddings() is base.encoder.get_input_embeddings()
