"""Batch inference without a cluster: input specs, bad rows, shards, and errors before any model loads."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilray.batch import shards
from distilray.batch.inputs import (
    check_inputs,
    normalise_texts,
    read_input,
    resolve_inputs,
    text_errors,
)
from distilray.cli import main
from distilray.errors import DataError


def _parquet(path, texts, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **extra}), path)
    return path


def test_specs_resolve_to_sorted_data_files(tmp_path):
    for name in ("b.parquet", "a.parquet", "sub/c.parquet"):
        _parquet(tmp_path / "in" / name, ["x"])
    (tmp_path / "in" / "notes.txt").write_text("not data")
    (tmp_path / "in" / "_SUCCESS").write_text("")
    names = [f.path.rsplit("/", 1)[-1] for f in resolve_inputs(str(tmp_path / "in"))]
    assert names == ["a.parquet", "b.parquet", "c.parquet"]
    assert [f.index for f in resolve_inputs(str(tmp_path / "in"))] == [0, 1, 2]
    assert len(resolve_inputs(str(tmp_path / "in" / "*.parquet"))) == 2
    assert resolve_inputs(str(tmp_path / "in" / "a.parquet"))[0].path == str(tmp_path / "in" / "a.parquet")
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_inputs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no parquet, CSV or JSONL files found"):
        resolve_inputs(str(tmp_path / "empty"))


def test_jsonl_with_mixed_types_keeps_every_row_and_flags_the_bad_ones(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"id": 0, "text": "fine"}, {"id": 1, "text": ""}, {"id": 2, "text": None},
            {"id": 3, "text": 5}, {"id": 4, "text": "x" * 20_000}, {"id": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, texts = normalise_texts(*read_input(str(path), "text"), 10_000)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4, 5]
    errors = table.column("error").to_pylist()
    assert errors[0] is None and texts[0] == "fine"
    assert errors[1] == "text is empty"
    assert errors[2] == errors[5] == "text is missing, not a string"
    assert errors[3] == "text is int, not a string"
    assert table.column("text").to_pylist()[3] == "5"  # kept, as JSON text, in the output
    assert errors[4] == "text has 20000 characters (limit 10000: predict.max_text_chars)"
    assert texts[1:] == [""] * 5


def test_text_errors():
    assert text_errors(["ok", "  ", 3, None, [1]], 5) == [
        None, "text is empty", "text is int, not a string", "text is missing, not a string",
        "text is list, not a string"]


def test_unreadable_file_and_missing_column_fail_before_any_model_loads(tmp_path, capsys):
    good = _parquet(tmp_path / "in" / "a.parquet", ["x"], id=[1])
    with pytest.raises(DataError, match=r"a.parquet: no column 'sentence' \(have: text, id\); set --text-column"):
        check_inputs(resolve_inputs(str(good)), "sentence")
    (tmp_path / "in" / "b.parquet").write_bytes(b"not parquet at all")
    # the checkpoint does not exist either: the input is checked first, so that is not the error
    rc = main(["predict", "--checkpoint", str(tmp_path / "no-ckpt"), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("distilray predict: error: ") and "b.parquet: cannot read as parquet" in err[0]
    assert not (tmp_path / "out").exists()
    rc = main(["predict", "--checkpoint", str(tmp_path), "--input", str(good), "--output",
               str(tmp_path / "out"), "--text-column", "sentence"])
    assert rc == 2 and "no column 'sentence'" in capsys.readouterr().err


def test_batch_mode_needs_a_checkpoint_and_an_output(capsys, tmp_path):
    assert main(["predict", "--input", str(tmp_path)]) == 2
    assert "needs --checkpoint DIR and --output DIR" in capsys.readouterr().err


def _predictions(n):
    return pa.table({"__row": pa.array(range(n), pa.int64()), "label": ["pos"] * n,
                     "score": pa.array([0.9] * n, pa.float32()),
                     "probabilities": pa.array([[0.1, 0.9]] * n, pa.list_(pa.float32())),
                     "error": pa.array([None] * n, pa.string())})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_shard_is_trusted_only_when_its_record_and_hash_match(tmp_path, fmt):
    table = pa.table({"text": ["a", "b", "c"], "id": [7, 8, 9], "label": [0, 1, 0]})
    merged = shards.merge_predictions(table, _predictions(3), "in.parquet")
    assert merged.column_names == ["text", "id", "label", "predicted_label", "score", "probabilities",
                                   "error"]
    assert merged.column("label").to_pylist() == [0, 1, 0]
    record = shards.write_shard(tmp_path, 0, fmt, merged, "in.parquet", "sha")
    assert record["rows"] == 3 and record["errors"] == 0
    assert shards.shard_done(tmp_path, 0, fmt, "in.parquet", "sha")
    assert not shards.shard_done(tmp_path, 0, fmt, "in.parquet", "other-checkpoint")
    assert not shards.shard_done(tmp_path, 0, fmt, "other-input.parquet", "sha")
    shard = tmp_path / shards.shard_name(0, fmt)
    shard.write_bytes(shard.read_bytes()[:-5])  # torn by a crash after the record was written
    assert not shards.shard_done(tmp_path, 0, fmt, "in.parquet", "sha")
    assert not shards.shard_done(tmp_path, 1, fmt, "in.parquet", "sha")


def test_lost_or_reordered_predictions_are_refused(tmp_path):
    table = pa.table({"text": ["a", "b", "c"]})
    with pytest.raises(DataError, match="2 predictions for 3 rows"):
        shards.merge_predictions(table, _predictions(2), "in.parquet")
    reordered = _predictions(3).take([1, 0, 2])
    with pytest.raises(DataError, match="lost or reordered"):
        shards.merge_predictions(table, reordered, "in.parquet")


def test_an_output_with_results_needs_resume(tmp_path):
    shards.check_output(tmp_path / "new", resume=False)
    (tmp_path / "part-00000.parquet").write_text("")
    with pytest.raises(DataError, match="already holds results; pass --resume"):
        shards.check_output(tmp_path, resume=False)
    shards.check_output(tmp_path, resume=True)
