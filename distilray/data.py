"""Datasets as validated Arrow tables, and tokenisation/padding as pure functions.

Every source — hub (`imdb`, `glue/sst2`), local parquet/CSV/JSONL, `synthetic:sentiment` —
ends up as two `pyarrow.Table`s with columns `text` (string) and `label` (int64). Nothing here
imports Ray: the same tokenise and pad functions run in Ray Data `map_batches`, in the
training collate, and in the Serve replica.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distilray.config import DataConfig
from distilray.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


@dataclass(frozen=True)
class Splits:
    train: pa.Table
    eval: pa.Table
    source: str
    """Human-readable description of where the rows came from."""


# --------------------------------------------------------------------------- validation


def validate_table(table: pa.Table, where: str, text_column: str, label_column: str,
                   num_labels: int) -> pa.Table:
    """Check columns, text and labels; return a table with exactly `text` and `label`."""
    have = ", ".join(table.column_names) or "none"
    for role, col in (("text", text_column), ("label", label_column)):
        if col not in table.column_names:
            raise DataError(f"{where}: no column '{col}' (have: {have}); "
                            f"set data.{role}_column to the column holding the {role}")
    if table.num_rows == 0:
        raise DataError(f"{where}: the split is empty (0 rows)")

    text = table.column(text_column)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        row = 0
        raise DataError(f"{where}: row {row}, column '{text_column}': text must be a string, "
                        f"got {text.type} ({text[row].as_py()!r})")
    bad = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
    bad_idx = pc.indices_nonzero(pc.fill_null(bad, True))
    if len(bad_idx):
        row = bad_idx[0].as_py()
        raise DataError(f"{where}: row {row}, column '{text_column}': empty or missing text "
                        f"({len(bad_idx)} such rows)")

    label = table.column(label_column)
    if not pa.types.is_integer(label.type):
        idx = _first_non_integer(label)
        raise DataError(f"{where}: row {idx}, column '{label_column}': {label[idx].as_py()!r} is not "
                        f"an integer label in [0, {num_labels - 1}]")
    out_of_range = pc.or_kleene(pc.is_null(label),
                                pc.or_(pc.less(label, 0), pc.greater_equal(label, num_labels)))
    bad_idx = pc.indices_nonzero(pc.fill_null(out_of_range, True))
    if len(bad_idx):
        row = bad_idx[0].as_py()
        raise DataError(f"{where}: row {row}, column '{label_column}': {label[row].as_py()!r} is not "
                        f"an integer label in [0, {num_labels - 1}] (model.num_labels={num_labels})")
    return pa.table({"text": text.cast(pa.string()), "label": label.cast(pa.int64())})


def _first_non_integer(label: pa.ChunkedArray) -> int:
    for i, value in enumerate(label.to_pylist()):
        if not isinstance(value, int) or isinstance(value, bool):
            if isinstance(value, float) and value.is_integer():
                continue
            return i
    return 0


# --------------------------------------------------------------------------- sources


def read_table_file(path: Path) -> pa.Table:
    """Read one parquet/CSV/JSONL file, naming the file on any failure."""
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' "
                        f"(use {', '.join(FILE_FORMATS)})")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if fmt == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        import pyarrow.json as pjson

        return pjson.read_json(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read as {fmt}: {msg}") from None


def _split_files(directory: Path, split: str) -> list[Path]:
    found: list[Path] = []
    for ext in FILE_FORMATS:
        found += sorted(directory.glob(f"{split}{ext}")) + sorted(directory.glob(f"{split}-*{ext}"))
        found += sorted((directory / split).glob(f"*{ext}")) if (directory / split).is_dir() else []
    return found


def _read_split(files: list[Path]) -> pa.Table:
    tables = [read_table_file(f) for f in files]
    try:
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as exc:
        raise DataError(f"{files[0].parent}: split files have different schemas: {exc}") from None


def _load_local(cfg: DataConfig, path: Path) -> tuple[dict[str, tuple[str, pa.Table]], str]:
    if path.is_file():
        return {cfg.train_split: (str(path), read_table_file(path))}, str(path)
    splits = {}
    for split in (cfg.train_split, cfg.eval_split):
        files = _split_files(path, split)
        if files:
            where = str(files[0]) if len(files) == 1 else f"{path}/{split}*"
            splits[split] = (where, _read_split(files))
    if cfg.train_split not in splits:
        raise DataError(f"{path}: no '{cfg.train_split}' split found (looked for "
                        f"{cfg.train_split}.parquet/.csv/.jsonl, {cfg.train_split}-*.parquet, "
                        f"{cfg.train_split}/*.parquet); set data.train_split")
    return splits, str(path)


def hub_dataset_name(spec: str) -> tuple[str, str | None]:
    """`glue/sst2` and `name:subset` name a dataset and its subset; `org/name` is a repo id."""
    if ":" in spec:
        name, _, subset = spec.partition(":")
        return name, subset or None
    head, _, tail = spec.partition("/")
    if head in ("glue", "super_glue") and tail:
        return head, tail
    return spec, None


GLUE_TEXT_COLUMNS = {"sst2": "sentence", "cola": "sentence"}
"""GLUE's single-sentence tasks name their text column `sentence` (as in transformers' run_glue)."""


def hub_text_column(cfg: DataConfig, columns: Sequence[str]) -> str:
    """data.text_column, or GLUE's own name for it when the default `text` is absent."""
    name, subset = hub_dataset_name(cfg.dataset)
    if cfg.text_column not in columns and cfg.text_column == "text" and name == "glue":
        return GLUE_TEXT_COLUMNS.get(subset or "", cfg.text_column)
    return cfg.text_column


def _load_hub(cfg: DataConfig) -> tuple[dict[str, tuple[str, pa.Table]], str]:
    import datasets

    name, subset = hub_dataset_name(cfg.dataset)
    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as exc:  # datasets raises many unrelated types for "not found/offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load dataset '{cfg.dataset}': tried a local path (none), the built-in "
            f"synthetic datasets ({SYNTHETIC_PREFIX}sentiment) and the Hugging Face Hub ({first})"
        ) from None
    splits = {}
    for split in (cfg.train_split, cfg.eval_split):
        if split in loaded:
            splits[split] = (f"{cfg.dataset}[{split}]", loaded[split].with_format("arrow")[:])
    if cfg.train_split not in splits:
        raise DataError(f"dataset '{cfg.dataset}' has no split '{cfg.train_split}' "
                        f"(have: {', '.join(loaded)}); set data.train_split")
    return splits, f"hub:{cfg.dataset}"


def load_splits(cfg: DataConfig, num_labels: int) -> Splits:
    """Load, validate and subsample the train and eval splits the config names."""
    if cfg.dataset.startswith(SYNTHETIC_PREFIX):
        kind = cfg.dataset.removeprefix(SYNTHETIC_PREFIX)
        if kind != "sentiment":
            raise DataError(f"unknown synthetic dataset '{cfg.dataset}' (have: {SYNTHETIC_PREFIX}sentiment)")
        table = generate_synthetic_sentiment(cfg.synthetic_size, seed=cfg.seed)
        raw = {cfg.train_split: (cfg.dataset, table)}
        source = f"{cfg.dataset} ({cfg.synthetic_size} generated rows, seed {cfg.seed})"
        text_col, label_col = "text", "label"
    else:
        path = Path(cfg.dataset).expanduser()
        if path.exists():
            raw, source = _load_local(cfg, path)
            text_col = cfg.text_column
        elif cfg.dataset.startswith(("/", "./", "../", "~")) or Path(cfg.dataset).suffix in FILE_FORMATS:
            where = "" if path.is_absolute() else (
                f" (a relative path is read from the working directory: looked for {path.resolve()}; "
                "give an absolute path or run from the directory it is relative to)")
            raise DataError(f"{cfg.dataset}: no such file or directory{where}")
        else:
            raw, source = _load_hub(cfg)
            text_col = hub_text_column(cfg, raw[cfg.train_split][1].column_names)
        label_col = cfg.label_column

    where, train = raw[cfg.train_split]
    train = validate_table(train, where, text_col, label_col, num_labels)
    if cfg.eval_split in raw:
        where, ev = raw[cfg.eval_split]
        ev = validate_table(ev, where, text_col, label_col, num_labels)
    else:
        train, ev = carve_validation(train, cfg.validation_fraction, cfg.seed)
        if ev.num_rows == 0 or train.num_rows == 0:
            raise DataError(f"{where}: {train.num_rows + ev.num_rows} rows are too few to carve a "
                            f"validation split of fraction {cfg.validation_fraction}")
        source += f" (validation carved: {cfg.validation_fraction:.0%}, seed {cfg.seed})"
    train = subsample(train, cfg.max_train_samples, cfg.seed)
    ev = subsample(ev, cfg.max_eval_samples, cfg.seed)
    return Splits(train=train, eval=ev, source=source)


def carve_validation(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split rows into (train, validation) with a fixed-seed permutation."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_val = int(round(table.num_rows * fraction))
    return table.take(np.sort(order[n_val:])), table.take(np.sort(order[:n_val]))


def subsample(table: pa.Table, limit: int | None, seed: int) -> pa.Table:
    """The first `limit` rows of a seeded shuffle (all rows, in order, when no limit)."""
    if limit is None or limit >= table.num_rows:
        return table
    order = np.random.default_rng(seed + 1).permutation(table.num_rows)[:limit]
    return table.take(np.sort(order))


# --------------------------------------------------------------------------- synthetic corpus

_POS_ADJ = ["wonderful", "brilliant", "moving", "delightful", "charming", "superb", "gripping",
            "funny", "beautiful", "clever", "touching", "excellent", "memorable", "fresh"]
_NEG_ADJ = ["boring", "dull", "awful", "clumsy", "tedious", "predictable", "bland", "terrible",
            "messy", "pointless", "lifeless", "weak", "forgettable", "painful"]
_NOUNS = ["movie", "film", "plot", "script", "acting", "soundtrack", "ending", "cast",
          "story", "direction", "dialogue", "cinematography", "pacing", "performance"]
_ADVERBS = ["", "really ", "truly ", "quite ", "utterly ", "rather ", "surprisingly ", "very "]
_POS_VERBS = ["loved", "enjoyed", "adored", "admired", "recommend"]
_NEG_VERBS = ["hated", "disliked", "regretted", "could not stand", "resented"]
_FILLERS = ["i watched it on a rainy sunday .", "my friend picked it for movie night .",
            "it runs about two hours .", "the theater was half empty .",
            "i had read the book before .", "it opened last friday in most cities .",
            "we bought popcorn and sat in the back row ."]


def _clause(rng: random.Random, positive: bool) -> str:
    """One sentiment-bearing clause; negation flips the adjective's polarity."""
    noun = rng.choice(_NOUNS)
    negate = rng.random() < 0.25
    adj_positive = positive != negate
    adj = rng.choice(_POS_ADJ if adj_positive else _NEG_ADJ)
    style = rng.randrange(4)
    if style == 0:
        return f"the {noun} was {'not ' if negate else ''}{rng.choice(_ADVERBS)}{adj}"
    if style == 1:
        verb = rng.choice(_POS_VERBS if positive else _NEG_VERBS)
        return f"i {verb} the {noun}"
    if style == 2:
        return f"{'nobody would call' if negate else 'everyone will find'} the {noun} {adj}"
    return f"a {rng.choice(_ADVERBS)}{adj} {noun}" if not negate else \
        f"hardly a {adj} {noun}"


def generate_synthetic_sentiment(n: int, seed: int = 0) -> pa.Table:
    """A seeded demo corpus of labelled review sentences (not real data: for offline demos).

    Templates vary; a quarter of clauses are negated; mixed reviews ("X, but Y") take the
    sentiment of the clause after "but"; neutral filler sentences vary the length.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        positive = bool(label)
        parts = []
        if rng.random() < 0.3:
            parts.append(rng.choice(_FILLERS))
        if rng.random() < 0.3:
            parts.append(f"{_clause(rng, not positive)} , but {_clause(rng, positive)} .")
        else:
            parts.append(_clause(rng, positive) + " .")
        if rng.random() < 0.3:
            parts.append(_clause(rng, positive) + " .")
        if rng.random() < 0.2:
            parts.append(rng.choice(_FILLERS))
        texts.append(" ".join(parts))
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return pa.table({"text": [texts[i] for i in order], "label": pa.array([labels[i] for i in order],
                                                                           pa.int64())})


# --------------------------------------------------------------------------- tokenising and padding


TRUNCATIONS = ("head", "head+tail")
HEAD_FRACTION = 0.25
"""head+tail keeps the first quarter and the last three quarters of the token budget (Sun et
al. 2019, "How to Fine-Tune BERT for Text Classification?": 128 head + 382 tail of 512
tokens was their best on IMDb)."""


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   max_length: int, truncation: str = "head") -> list[list[int]]:
    """Token ids truncated to max_length, unpadded (padding happens per batch).

    `head`: the first max_length tokens, as `transformers.pipeline(truncation=True)`;
    `head+tail`: a long text keeps its beginning and its end (where reviews conclude).
    """
    if truncation == "head":
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]
    if truncation != "head+tail":
        raise ValueError(f"truncation={truncation!r}; choose one of {TRUNCATIONS}")
    # BERT-family single sequences: one special token first ([CLS]), the rest last ([SEP])
    special = tokenizer.num_special_tokens_to_add()
    budget = max_length - special
    head = int(budget * HEAD_FRACTION)
    enc = tokenizer(list(texts), truncation=False, padding=False, verbose=False,
                    return_attention_mask=False, return_token_type_ids=False)
    out = []
    for ids in enc["input_ids"]:
        if len(ids) > max_length:
            first, content, last = ids[:1], ids[1: len(ids) - special + 1], ids[len(ids) - special + 1:]
            ids = first + content[:head] + content[len(content) - (budget - head):] + last
        out.append(ids)
    return out


def padded_length(lengths: Sequence[int], padding: str, max_length: int, multiple_of: int) -> int:
    """Width of a padded batch: max_length, or the longest row rounded up to multiple_of."""
    if padding == "max_length":
        return max_length
    longest = max(lengths) if len(lengths) else 1
    return min(max_length, -(-longest // multiple_of) * multiple_of) if multiple_of > 1 else longest


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, padding: str = "dynamic",
              max_length: int = 128, multiple_of: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id rows into (input_ids, attention_mask) int64 arrays."""
    lengths = [len(r) for r in ids]
    width = max(padded_length(lengths, padding, max_length, multiple_of), max(lengths, default=0))
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def bucket_order(lengths: Sequence[int], batch_size: int, window_batches: int,
                 seed: int = 0) -> np.ndarray:
    """Row order that sorts by length inside windows of `window_batches` batches.

    Batches of similar lengths waste less padding; shuffling the batches of each window
    keeps long and short batches mixed over an epoch.
    """
    n = len(lengths)
    if window_batches <= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    lengths_arr = np.asarray(lengths)
    window = batch_size * window_batches
    order = []
    for start in range(0, n, window):
        idx = np.arange(start, min(start + window, n))
        idx = idx[np.argsort(lengths_arr[idx], kind="stable")]
        batches = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
        rng.shuffle(batches)
        order.extend(np.concatenate(batches))
    return np.asarray(order, dtype=np.int64)


def padding_stats(lengths: Sequence[int], batch_size: int, padding: str, max_length: int,
                  multiple_of: int) -> dict[str, float]:
    """Real vs padded token counts when rows are batched in the given order."""
    real = padded = 0
    for i in range(0, len(lengths), batch_size):
        batch = [min(n, max_length) for n in lengths[i: i + batch_size]]
        real += sum(batch)
        padded += len(batch) * padded_length(batch, padding, max_length, multiple_of)
    return {"real_tokens": real, "padded_tokens": padded,
            "pad_fraction": 1 - real / padded if padded else 0.0}


def encode_for_model(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                     multiple_of: int = 8) -> dict[str, Any]:
    """Tokenise and dynamically pad texts into model inputs (numpy), e.g. for serving."""
    ids = tokenize_texts(tokenizer, texts, max_length)
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id or 0, "dynamic", max_length, multiple_of)
    return {"input_ids": input_ids, "attention_mask": mask}
