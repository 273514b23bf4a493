"""Typed field / entity markers on the model side: the special tokens, the resized embeddings, and
``model.pooling: markers``.

Field markers (``text.field_markers``) follow ETS-Lab's KDD Cup 2022 solution (typed tokens
``[QUERY] [TITLE] [BRAND] [COLOR] [BULLET] [DESC]`` before each field, the hidden states at those
tokens concatenated for the head); entity markers (``text.entity_markers``) follow Zhong & Chen
2020, "A Frustratingly Easy Approach for Entity and Relation Extraction" (arXiv:2010.12812). The
text side (template, budgets, gazetteer) is in :mod:`core.data.text`.

New embedding rows: each marker's row starts as the mean embedding of its name word(s) (``[DESC]``
-> "description", ``[/BRAND]`` -> "end brand"), so the marker means something to the pre-trained
backbone from the first step. With ``model.freeze_embeddings`` the embedding matrix stays frozen
(fast AdamW steps on CPU) and a small trainable offset per marker (:class:`MarkerOffsets`, zeros
at the start, learning rate ``train.head_lr`` as everything outside ``backbone.``) is added to the
marker rows' output, so the markers still learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import TextConfig
from core.data.text import FIELD_MARKERS, marker_tokens

#: the word(s) whose mean embedding starts each marker's new row
MARKER_NAME_WORDS = {
    "[QUERY]": "query",
    "[TITLE]": "title",
    "[BRAND]": "brand",
    "[COLOR]": "color",
    "[BULLET]": "bullet",
    "[DESC]": "description",
    "[/BRAND]": "end brand",
    "[/COLOR]": "end color",
}
#: parameter name prefix of the frozen-embedding offsets inside a CrossEncoder
OFFSETS_NAME = "marker_offsets"


@dataclass(frozen=True)
class MarkerSpec:
    """What a model needs to match a tokenizer with markers.

    ``vocab_size``: ``len(tokenizer)`` after the markers were added; ``new_ids``: the markers'
    token ids; ``init_ids``: per marker, the token ids of its name word(s); ``slot_ids`` /
    ``slot_segments``: the pooling slots of ``model.pooling: markers`` (``[QUERY]`` in segment 0,
    then the marker of each ``text.fields`` entry in segment 1), empty without field markers.
    """

    vocab_size: int
    new_ids: tuple[int, ...]
    init_ids: tuple[tuple[int, ...], ...]
    slot_ids: tuple[int, ...] = ()
    slot_segments: tuple[int, ...] = ()


def add_marker_tokens(tokenizer, text: TextConfig) -> MarkerSpec | None:
    """Add the marker tokens ``text`` needs (:func:`core.data.text.marker_tokens`) to ``tokenizer``
    as additional special tokens (never split, never lower-cased); None when both switches are off.

    Returns:
        The :class:`MarkerSpec` for :func:`resize_for_markers` and the ``markers`` pooling.

    Raises:
        ValueError: a marker still does not tokenize to one token.
    """
    tokens = marker_tokens(text)
    if not tokens:
        return None
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the tokenizer did not take the marker tokens {tokens}")
    init = tuple(tuple(tokenizer(MARKER_NAME_WORDS[t], add_special_tokens=False)["input_ids"]) for t in tokens)
    slots = ["query", *text.fields] if text.field_markers else []
    return MarkerSpec(
        vocab_size=len(tokenizer),
        new_ids=tuple(int(i) for i in ids),
        init_ids=init,
        slot_ids=tuple(int(tokenizer.convert_tokens_to_ids(FIELD_MARKERS[f])) for f in slots),
        slot_segments=tuple(0 if f == "query" else 1 for f in slots),
    )


class MarkerOffsets(nn.Module):
    """A trainable vector per marker, added to the word embedding of that marker's tokens.

    ``forward(input_ids)`` (B, T) -> (B, T, H): row j of ``weight`` (n_markers, H) where
    ``input_ids == ids[j]``, zeros elsewhere. Starts at zeros (the marker rows' own init).
    """

    def __init__(self, ids: tuple[int, ...], hidden: int):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.zeros(len(ids), hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        onehot = (input_ids.unsqueeze(-1) == self.ids).to(self.weight.dtype)  # (B, T, n)
        return onehot @ self.weight


def resize_for_markers(model: nn.Module, spec: MarkerSpec, trainable_offsets: bool = False) -> None:
    """Give ``model`` (a :class:`core.modeling.model.CrossEncoder`) rows for the marker tokens.

    Grows the backbone's input embeddings to ``spec.vocab_size`` rows when it has fewer (never
    shrinks: some checkpoints carry spare rows), sets each marker's row to the mean embedding of
    its name word(s) (:data:`MARKER_NAME_WORDS`; the mean of all old rows when a name has no
    tokens), and with ``trainable_offsets`` (frozen word embeddings) adds ``model.marker_offsets``
    (:class:`MarkerOffsets`) through a forward hook on the embedding layer. Call it before
    ``load_state_dict`` of a checkpoint saved from such a model (shapes and parameter names).

    Raises:
        ValueError: a marker id beyond the resized table.
    """
    backbone = model.backbone
    rows = backbone.get_input_embeddings().weight.shape[0]
    if spec.vocab_size > rows:
        backbone.resize_token_embeddings(spec.vocab_size, mean_resizing=False)
    emb = backbone.get_input_embeddings()
    weight = emb.weight
    if max(spec.new_ids) >= weight.shape[0]:
        raise ValueError(f"marker id {max(spec.new_ids)} beyond the embedding table ({weight.shape[0]} rows)")
    with torch.no_grad():
        base = weight[: min(rows, min(spec.new_ids))]
        for tid, src in zip(spec.new_ids, spec.init_ids):
            src = [i for i in src if i < rows and i not in spec.new_ids]
            weight[tid] = weight[src].mean(0) if src else base.mean(0)
    if trainable_offsets:
        offsets = MarkerOffsets(spec.new_ids, weight.shape[1]).to(weight.device)
        setattr(model, OFFSETS_NAME, offsets)
        emb.register_forward_hook(lambda _m, inp, out: out + offsets(inp[0]).to(out.dtype))


def marker_pool(
    hidden: torch.Tensor, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, slot_ids, slot_segments
) -> torch.Tensor:
    """``model.pooling: markers``: the hidden state at each slot's marker, concatenated.

    Args:
        hidden: (B, T, H) last hidden states.
        input_ids: (B, T) token ids.
        token_type_ids: (B, T) segment of each token, or None; a slot's marker is looked for in
            its segment only (entity markers in the query reuse ``[BRAND]``/``[COLOR]``).
        slot_ids: (S,) long tensor, the marker id of each slot.
        slot_segments: (S,) long tensor, the segment each slot's marker is in.

    Returns:
        (B, S * H): slot s occupies columns ``s*H:(s+1)*H``; the first occurrence of the marker,
        zeros where the row has none (a field that is empty or cut away).
    """
    b, t, h = hidden.shape
    hit = input_ids.unsqueeze(1) == slot_ids.view(1, -1, 1)  # (B, S, T)
    if token_type_ids is not None:
        hit = hit & (token_type_ids.unsqueeze(1) == slot_segments.view(1, -1, 1))
    pos = torch.arange(t, device=hidden.device).view(1, 1, t)
    first = torch.where(hit, pos, t).min(-1).values  # (B, S); t = absent
    present = (first < t).unsqueeze(-1).to(hidden.dtype)
    idx = first.clamp(max=t - 1).unsqueeze(-1).expand(-1, -1, h)
    return (hidden.gather(1, idx) * present).reshape(b, -1)
