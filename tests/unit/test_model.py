"""Model resolver and the exact BertModel → DistilBERT conversion of all-MiniLM-L6-v2."""

import json

import pytest
import torch

from distilray.errors import ModelError
from distilray.model import (
    MINILM_WEIGHTS_SHA256,
    _minilm_dir,
    convert_minilm,
    load_classifier,
    load_tokenizer,
    resolve_model,
)

SENTENCES = [
    "it 's a charming and often affecting journey . ",
    "unflinchingly bleak and desperate ",
    "the acting , costumes , music , cinematography and sound are all astounding given the "
    "production 's austere locales . ",
    "a sometimes tedious film .",
]


def test_converted_hidden_states_match_bert_model(tmp_path):
    from transformers import BertModel, DistilBertModel

    target = convert_minilm(str(tmp_path))
    assert json.loads((target / "distilray_source.json").read_text())["sha256"] == MINILM_WEIGHTS_SHA256
    tok = load_tokenizer(resolve_model("offline:minilm", str(tmp_path)))
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert "token_type_ids" not in enc
    bert = BertModel.from_pretrained(str(_minilm_dir())).eval()
    distil = DistilBertModel.from_pretrained(str(target)).eval()
    with torch.no_grad():
        expected = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        actual = distil(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert actual.shape == expected.shape == (len(SENTENCES), enc["input_ids"].shape[1], 384)
    assert (actual[mask] - expected[mask]).abs().max().item() < 1e-4
    assert expected[mask].abs().max().item() > 0.1  # the comparison is not of zeros


def test_sha256_mismatch_is_a_clear_error_and_caches_nothing(tmp_path):
    with pytest.raises(ModelError, match=r"sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        convert_minilm(str(tmp_path), expected_sha256="0" * 64)
    assert not list((tmp_path).rglob("config.json"))


def test_tiny_model_is_small_and_seeded():
    src = resolve_model("tiny")
    a = load_classifier(src, ["neg", "pos"], seed=1)
    b = load_classifier(src, ["neg", "pos"], seed=1)
    assert sum(p.numel() for p in a.parameters()) < 3_000_000
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.config.id2label == {0: "neg", 1: "pos"}


def test_local_checkpoint_directory_round_trip(tmp_path):
    model = load_classifier(resolve_model("tiny"), ["neg", "pos"], seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    load_tokenizer(resolve_model("tiny")).save_pretrained(tmp_path / "ckpt")
    src = resolve_model(str(tmp_path / "ckpt"))
    assert src.kind == "local"
    again = load_classifier(src, ["neg", "pos"])
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    with pytest.raises(ModelError, match="classifies 2 labels but the config asks for 3"):
        load_classifier(src, ["a", "b", "c"])


def test_unknown_model_names_every_source_tried(tmp_path):
    with pytest.raises(ModelError, match=r"cannot load model 'no-such-org/no-such-model': tried a local "
                                         r"directory \(none\), the offline aliases \(offline:minilm, tiny\) "
                                         r"and the Hugging Face Hub"):
        load_classifier(resolve_model("no-such-org/no-such-model"), ["a", "b"])
    with pytest.raises(ModelError, match="no such local directory"):
        resolve_model(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
