"""Zero-shot dense (bi-encoder) relevance: cosine of mean-pooled sentence embeddings.

all-MiniLM-L6-v2 is a sentence-embedding model (Reimers & Gurevych 2019, Sentence-BERT; mean
pooling + L2 normalisation), so without any fine-tuning the cosine between a query and a
product's title/brand/color is a relevance score, independent of the cross-encoder's errors.
E5 models expect ``query: `` / ``passage: `` prefixes (Wang et al. 2022); pass them for those.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from core.data.text import clean_text
from core.modeling.model import load_backbone, load_tokenizer

DENSE_FIELDS = ("product_title", "product_brand", "product_color")


@torch.inference_mode()
def embed_texts(
    texts: list[str], model_name: str, max_length: int = 64, batch_size: int = 64, device: str | None = None
) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings: float32 (len(texts), hidden).

    Texts are encoded in length-sorted batches (little padding); order is kept.

    Raises:
        ConfigError: the model cannot be resolved or loaded (see :func:`core.modeling.model.resolve_model_path`).
    """
    tok = load_tokenizer(model_name)  # checked first: one line for a bad or unreachable name
    model = load_backbone(model_name).eval()  # no pooler: we mean-pool ourselves
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        batch = tok(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(dev)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out[idx] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
    return out


def default_prefixes(model_name: str) -> tuple[str, str]:
    """(query prefix, passage prefix) a model was trained with: ``("query: ", "passage: ")`` for the
    E5 family (Wang et al. 2022, arXiv:2212.03533: without them E5 scores drop), ``("", "")`` otherwise."""
    from core.modeling.e5convert import E5_ALIASES

    name = model_name.lower().rstrip("/")
    if name in E5_ALIASES or name.rsplit("/", 1)[-1].startswith(("e5-", "multilingual-e5-")):
        return "query: ", "passage: "
    return "", ""


def dense_scores(
    df: pd.DataFrame,
    model_name: str = "all-MiniLM-L6-v2",
    fields=DENSE_FIELDS,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    max_length: int = 64,
) -> np.ndarray:
    """Cosine similarity of each row's query and product: float32 (N,).

    Args:
        df: N examples with ``query``, ``product_id`` and the ``fields`` columns.
        query_prefix, passage_prefix: text put before each query / product text; None = the
            model's own (:func:`default_prefixes`: E5 models get ``query: `` / ``passage: ``).

    Each distinct query and each distinct product is embedded once.
    """
    auto_q, auto_p = default_prefixes(model_name)
    query_prefix = auto_q if query_prefix is None else query_prefix
    passage_prefix = auto_p if passage_prefix is None else passage_prefix
    queries = pd.unique(df["query"])
    q_pos = pd.Index(queries).get_indexer(df["query"])
    prods = df.drop_duplicates("product_id")
    p_text = [
        passage_prefix + " ".join(clean_text(v) for v in row if clean_text(v))
        for row in prods[list(fields)].itertuples(index=False)
    ]
    p_pos = pd.Index(prods["product_id"]).get_indexer(df["product_id"])
    q_emb = embed_texts([query_prefix + clean_text(q) for q in queries], model_name, max_length)
    p_emb = embed_texts(p_text, model_name, max_length)
    return np.einsum("nd,nd->n", q_emb[q_pos], p_emb[p_pos]).astype(np.float32)
