"""Data loading, validation messages, the synthetic corpus and dynamic padding."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilray.config import DataConfig
from distilray.data import (
    bucket_order,
    generate_synthetic_sentiment,
    load_splits,
    pad_batch,
    padding_stats,
    tokenize_texts,
)
from distilray.errors import DataError


def test_sst2_parquet_loads_with_official_row_counts(sst2_dir):
    splits = load_splits(DataConfig(dataset=str(sst2_dir)), num_labels=2)
    assert splits.train.num_rows == 67_349 and splits.eval.num_rows == 872
    assert splits.train.column_names == ["text", "label"]
    assert splits.eval.column("label").to_pylist().count(1) == 444


def test_subsampling_is_seeded_and_bounded(sst2_dir):
    cfg = DataConfig(dataset=str(sst2_dir), max_train_samples=500, max_eval_samples=100)
    a, b = load_splits(cfg, 2), load_splits(cfg, 2)
    assert a.train.num_rows == 500 and a.eval.num_rows == 100
    assert a.train.equals(b.train)


def test_validation_is_carved_with_a_fixed_seed(tmp_path):
    table = pa.table({"text": [f"row {i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    pq.write_table(table, tmp_path / "train.parquet")
    cfg = DataConfig(dataset=str(tmp_path), validation_fraction=0.2)
    a, b = load_splits(cfg, 2), load_splits(cfg, 2)
    assert (a.train.num_rows, a.eval.num_rows) == (80, 20)
    assert a.eval.equals(b.eval)
    assert not set(a.eval.column("text").to_pylist()) & set(a.train.column("text").to_pylist())


def test_csv_and_jsonl_with_custom_columns(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,y\ngood film,1\nbad film,0\nfine,1\n")
    rows = [{"sentence": "meh", "y": 0}, {"sentence": "great", "y": 1}]
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_splits(DataConfig(dataset=str(tmp_path), text_column="sentence", label_column="y"), 2)
    assert splits.train.num_rows == 3 and splits.eval.column("text").to_pylist() == ["meh", "great"]


def _write(tmp_path, name, **columns):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("columns, cfg_kw, message", [
    ({"sentence": ["a", "b"], "label": [0, 1]}, {},
     r"train.parquet: no column 'text' \(have: sentence, label\); set data.text_column"),
    ({"text": ["a", "b"], "target": [0, 1]}, {},
     r"train.parquet: no column 'label' \(have: text, target\); set data.label_column"),
    ({"text": ["a", "b", "c"], "label": [0, 2, 1]}, {},
     r"train.parquet: row 1, column 'label': 2 is not an integer label in \[0, 1\]"),
    ({"text": ["a", "b"], "label": [0, -1]}, {},
     r"row 1, column 'label': -1 is not an integer label"),
    ({"text": ["a", "b"], "label": ["pos", "neg"]}, {},
     r"row 0, column 'label': 'pos' is not an integer label in \[0, 1\]"),
    ({"text": ["a", "b", "c"], "label": [0.0, 1.5, 1.0]}, {},
     r"row 1, column 'label': 1.5 is not an integer label"),
    ({"text": ["a", "  ", "c"], "label": [0, 1, 1]}, {},
     r"train.parquet: row 1, column 'text': empty or missing text"),
    ({"text": ["a", None, "c"], "label": [0, 1, 1]}, {},
     r"row 1, column 'text': empty or missing text"),
    ({"text": [1, 2], "label": [0, 1]}, {},
     r"row 0, column 'text': text must be a string, got int64"),
    ({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}, {},
     r"train.parquet: the split is empty \(0 rows\)"),
])
def test_bad_data_is_named_by_file_row_and_column(tmp_path, columns, cfg_kw, message):
    path = _write(tmp_path, "train.parquet", **columns)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(dataset=str(path), **cfg_kw), num_labels=2)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"train.parquet: cannot read as parquet"):
        load_splits(DataConfig(dataset=str(bad)), 2)
    with pytest.raises(DataError, match="no such file or directory"):
        load_splits(DataConfig(dataset=str(tmp_path / "nope.parquet")), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no 'train' split found"):
        load_splits(DataConfig(dataset=str(tmp_path / "empty")), 2)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_splits(DataConfig(dataset=str(tmp_path / "data.txt")), 2)


def test_a_missing_relative_data_path_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(dataset="../shared/data/nope"), 2)
    assert str(err.value).startswith("../shared/data/nope: no such file or directory")
    assert f"looked for {(tmp_path / '../shared/data/nope').resolve()}" in str(err.value)


def test_unknown_hub_dataset_names_sources_tried():
    with pytest.raises(DataError, match=r"cannot load dataset 'no-such-dataset-xyz': tried a local path"):
        load_splits(DataConfig(dataset="no-such-dataset-xyz"), 2)
    with pytest.raises(DataError, match="unknown synthetic dataset"):
        load_splits(DataConfig(dataset="synthetic:weather"), 2)


def test_synthetic_corpus_is_seeded_balanced_and_varied():
    a, b = generate_synthetic_sentiment(400, seed=3), generate_synthetic_sentiment(400, seed=3)
    assert a.equals(b)
    assert not a.equals(generate_synthetic_sentiment(400, seed=4))
    labels = a.column("label").to_pylist()
    assert labels.count(0) == labels.count(1) == 200
    texts = a.column("text").to_pylist()
    assert len(set(texts)) > 350
    assert any(" not " in t for t in texts) and any(", but " in t for t in texts)
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) <= 5 and max(lengths) >= 25


def test_tokenize_truncates_and_pad_is_dynamic():
    from distilray.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("tiny"))
    ids = tokenize_texts(tok, ["a short one", "word " * 300], max_length=128)
    assert len(ids[1]) == 128 and ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    input_ids, mask = pad_batch([ids[0]], tok.pad_token_id, "dynamic", 128, 8)
    assert input_ids.shape == (1, 8) and mask.sum() == len(ids[0])
    input_ids, mask = pad_batch([ids[0]], tok.pad_token_id, "max_length", 128, 8)
    assert input_ids.shape == (1, 128)


def test_head_tail_truncation_keeps_the_start_and_the_end():
    from distilray.model import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("tiny"))
    words = [f"w{i}" for i in range(400)]
    text = " ".join(["alpha"] * 200 + ["omega"] * 200)
    head = tokenize_texts(tok, [text, "a short one"], 64)
    both = tokenize_texts(tok, [text, "a short one"], 64, truncation="head+tail")
    assert both[1] == head[1]  # short texts are untouched
    assert len(both[0]) == len(head[0]) == 64
    assert both[0][0] == tok.cls_token_id and both[0][-1] == tok.sep_token_id
    alpha, omega = tok.convert_tokens_to_ids(["alpha", "omega"])
    assert both[0][1:-1] == [alpha] * 15 + [omega] * 47  # a quarter of the 62 content tokens
    assert set(head[0][1:-1]) == {alpha}
    assert len(tokenize_texts(tok, [" ".join(words)], 32, "head+tail")[0]) == 32
    with pytest.raises(ValueError, match="truncation"):
        tokenize_texts(tok, ["x"], 32, truncation="tail")


def test_bucketing_reduces_padding_and_keeps_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, 1000).tolist()
    order = bucket_order(lengths, batch_size=16, window_batches=50, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    plain = padding_stats(lengths, 16, "dynamic", 128, 8)
    bucketed = padding_stats([lengths[i] for i in order], 16, "dynamic", 128, 8)
    fixed = padding_stats(lengths, 16, "max_length", 128, 8)
    assert fixed["padded_tokens"] > plain["padded_tokens"] > bucketed["padded_tokens"]
    assert plain["real_tokens"] == bucketed["real_tokens"] == fixed["real_tokens"]


def test_glue_sst2_reads_its_sentence_column_and_local_files_their_text_column():
    from distilray.data import hub_text_column

    assert hub_text_column(DataConfig(dataset="glue/sst2"), ["idx", "sentence", "label"]) == "sentence"
    assert hub_text_column(DataConfig(dataset="imdb"), ["text", "label"]) == "text"
    # an explicit data.text_column always wins
    assert hub_text_column(DataConfig(dataset="glue/sst2", text_column="x"), ["sentence"]) == "x"


def test_presets_name_dataset_sources_a_plain_clone_has():
    """configs/ and tune/ name Hub datasets or synthetic data, never a path outside the repo."""
    import yaml

    repo = Path(__file__).resolve().parents[2]
    for preset in sorted([*repo.glob("configs/*.yaml"), *repo.glob("tune/*.yaml"),
                          *repo.glob("distilray/presets/*.yaml")]):
        dataset = (yaml.safe_load(preset.read_text()).get("data") or {}).get("dataset")
        if dataset is None:
            continue
        assert dataset in ("glue/sst2", "imdb") or dataset.startswith("synthetic:"), (preset, dataset)
