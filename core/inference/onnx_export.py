"""``workbench export onnx``: each fold's cross-encoder as an ONNX graph, checked against torch.

Export: ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the dynamo exporter
needs ``onnxscript``, which is not installed) of the fold's :class:`core.modeling.model.CrossEncoder`
in eval mode, inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 (batch, tokens) with
both axes dynamic, output ``logits`` float32 (batch, 4). The file is written to a temporary file,
loaded into ONNX Runtime and compared with torch on real pairs of the run's data (two batches:
the longest pairs, and pairs of mixed lengths so padding is exercised); only when the largest
absolute difference of the probabilities is within ``tol`` (1e-4 in fp32) is it renamed to
``fold<k>/model.onnx`` (:func:`core.runs.lifecycle.atomic_write`): a failed check leaves nothing.

Fusion (default, ``--no-fuse`` to skip): the exported graph is rewritten by ONNX Runtime's
transformer optimiser (``onnxruntime.transformers.optimizer.optimize_model``, ``model_type="bert"``
with the backbone's heads and hidden size): each layer's attention sub-graph becomes one
``Attention`` op, the embeddings + LayerNorm one ``EmbedLayerNormalization``, residual + LayerNorm
``SkipLayerNormalization`` and the FFN bias + GELU ``BiasGelu`` (on all-MiniLM-L6-v2: 6, 1, 12
and 6 of them). ONNX Runtime's own session-time optimisations do not fuse the attention of this
graph (the exporter writes it from ``scaled_dot_product_attention``). The fused graph is checked
against torch the same way; when fusion fails or misses the tolerance, the plain graph is kept
(``ExportedFold.fused`` says which).

Inference (:func:`onnx_session`): ONNX Runtime with all graph optimisations (``ORT_ENABLE_ALL``),
on ``CUDAExecutionProvider`` when ONNX Runtime has it and a GPU is there, else
``CPUExecutionProvider``. ``--fp16`` (GPU machines) converts the graph with the same optimiser
(``use_gpu=True``, ``convert_float_to_float16`` with fp32 inputs/outputs kept); it is written as
``model.fp16.onnx``, checked with a tolerance of 1e-2, and preferred by ``--backend onnx`` where
the CUDA provider is present. Not tested here (no GPU on this machine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import WorkbenchError
from core.inference.predict import ONNX_FILE, TrainedRun, fold_model, softmax

log = logging.getLogger("esci.predict")

#: graph input names, in the order the exported forward takes them
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: the largest absolute difference of probabilities allowed between ONNX Runtime and torch (fp32)
TOL_FP32 = 1e-4
#: the same for an fp16 graph (GPU machines)
TOL_FP16 = 1e-2
FP16_FILE = "model.fp16.onnx"


@dataclass
class ExportedFold:
    """One exported fold: its ONNX file and the largest absolute differences from torch on the
    check batches (probabilities and logits)."""

    fold: int
    path: Path
    max_abs_diff: float
    max_abs_diff_logits: float
    fused: bool = False


def providers() -> list[str]:
    """ONNX Runtime execution providers to use: CUDA first when available (a GPU machine), then CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    want = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []
    return [*want, "CPUExecutionProvider"]


def onnx_session(path: str | Path, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime session over ``path``.

    Args:
        path: an ONNX file (:func:`export_run`).
        threads: intra-op threads (None: ONNX Runtime's default, the physical cores); inter-op 1.
        optimize: ``ORT_ENABLE_ALL`` graph optimisations (else ``ORT_DISABLE_ALL``).

    Raises:
        WorkbenchError: the file is missing or ONNX Runtime cannot load it (one line naming it).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers())
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise WorkbenchError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def onnx_forward(session) -> Callable[[dict], np.ndarray]:
    """:func:`core.inference.predict.score_pairs`'s ``forward`` over an ONNX Runtime session:
    batch of int64 tensors (B, T) -> probabilities float32 (B, 4) (softmax of the ``logits``).
    Inputs the graph does not take (``token_type_ids`` of a model without segment embeddings) are left out."""
    names = [i.name for i in session.get_inputs()]

    def forward(batch: dict) -> np.ndarray:
        feeds = {n: batch[n].numpy() for n in names}
        return softmax(session.run(["logits"], feeds)[0])

    return forward


def logits_module(model):
    """The fold model's forward with the three token inputs as positional arguments (what the
    exporter traces): ``(input_ids, attention_mask, token_type_ids)`` int64 (B, T) -> logits (B, 4)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    return Logits(model).eval()


def check_batches(encoded, pad_id: int, rows: int = 32, seed: int = 0) -> list[dict]:
    """Two batches of real pairs for the check: the ``rows`` longest sequences, and ``rows``
    random ones of mixed lengths (padded, so the attention mask matters). Each is a dict of int64
    tensors (B, T) (:func:`core.modeling.model.collate`)."""
    from core.modeling.model import collate

    n = len(encoded)
    longest = np.argsort(-encoded.lengths, kind="stable")[:rows]
    mixed = np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False)
    return [collate(encoded, longest, pad_id), collate(encoded, mixed, pad_id)]


def compare(model, session, batches: list[dict]) -> tuple[float, float]:
    """Largest absolute differences (probabilities, logits) between torch ``model`` and ONNX
    Runtime ``session`` over ``batches``."""
    import torch

    names = [i.name for i in session.get_inputs()]
    d_p = d_l = 0.0
    with torch.inference_mode():
        for b in batches:
            ref = model(**b).float().numpy()
            got = session.run(["logits"], {n: b[n].numpy() for n in names})[0].astype(np.float32)
            d_l = max(d_l, float(np.abs(ref - got).max()))
            d_p = max(d_p, float(np.abs(softmax(ref) - softmax(got)).max()))
    return d_p, d_l


def _torch_export(model, batches: list[dict], path: Path, opset: int) -> None:
    """``torch.onnx.export`` (TorchScript exporter) of a :func:`logits_module`, both axes dynamic,
    then ``onnx.checker``.

    Raises:
        WorkbenchError: the exporter fails or the graph is not valid ONNX (one line).
    """
    import warnings

    import onnx
    import torch

    args = tuple(batches[-1][n] for n in INPUT_NAMES)  # the mixed batch: padded rows, so the mask is traced
    dyn = {n: {0: "batch", 1: "tokens"} for n in INPUT_NAMES}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                input_names=list(INPUT_NAMES),
                output_names=["logits"],
                dynamic_axes={**dyn, "logits": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(path))  # well-formed ONNX (types, shapes, opset)
    except Exception as exc:  # noqa: BLE001 - the exporter and checker raise many kinds; one line
        raise WorkbenchError(f"{path}: ONNX export failed ({str(exc).splitlines()[0][:200]})") from None


def fuse_bert(src: Path, dst: Path, num_heads: int, hidden_size: int, use_gpu: bool = False) -> dict[str, int]:
    """ONNX Runtime's transformer optimiser over ``src`` (module docstring) written to ``dst``;
    returns the fused operator counts (``Attention``, ``SkipLayerNormalization``, ...)."""
    from onnxruntime.transformers.optimizer import optimize_model

    for name in ("onnxruntime.transformers", "onnx_model", "fusion_base"):
        logging.getLogger(name).setLevel(logging.ERROR)
    opt = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, use_gpu=use_gpu)
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def export_model(
    model,
    batches: list[dict],
    path: str | Path,
    opset: int = 17,
    threads: int | None = None,
    fuse: bool = True,
) -> tuple[float, float, bool]:
    """Export ``model`` (a :func:`logits_module`) to ``path`` atomically, checked first.

    The graph is written to a temporary file, fused (``fuse``: :func:`fuse_bert`, kept only when
    it passes the same check), loaded into ONNX Runtime and compared with torch on ``batches``
    (:func:`compare`); only within :data:`TOL_FP32` is it renamed to ``path``.

    Returns:
        (largest absolute difference of the probabilities, of the logits, whether fused).

    Raises:
        WorkbenchError: the exporter fails, or the plain graph's difference exceeds
            :data:`TOL_FP32` (nothing is written; a previous file at ``path`` stays).
    """
    import os

    from core.runs.lifecycle import atomic_write

    path = Path(path)
    result: list[tuple[float, float, bool]] = []
    cfg = model.m.backbone.config

    def write(tmp: Path) -> None:
        _torch_export(model, batches, tmp, opset)
        if fuse:
            fused = tmp.with_name(tmp.name + ".fused")
            try:
                ops = fuse_bert(tmp, fused, cfg.num_attention_heads, cfg.hidden_size)
                d = compare(model, onnx_session(fused, threads=threads), batches)
                if d[0] <= TOL_FP32 and ops:
                    os.replace(fused, tmp)
                    log.info("%s: fused %s", path, ops)
                    result.append((*d, True))
                    return
                log.warning("%s: fused graph differs by %.2e (or fused nothing): plain graph kept", path, d[0])
            except Exception as exc:  # noqa: BLE001 - the optimiser's failure only costs speed: keep the plain graph
                log.warning("%s: fusion failed (%s): plain graph kept", path, str(exc).splitlines()[0][:200])
            finally:
                fused.unlink(missing_ok=True)
        d = compare(model, onnx_session(tmp, threads=threads), batches)
        if d[0] > TOL_FP32:
            raise WorkbenchError(
                f"{path}: ONNX Runtime differs from torch by {d[0]:.2e} (probabilities) > {TOL_FP32:.0e}; not written"
            )
        result.append((*d, False))

    atomic_write(path, write)
    return result[-1]


def export_fold(
    run: TrainedRun, k: int, batches: list[dict], opset: int = 17, threads: int | None = None, fuse: bool = True
) -> ExportedFold:
    """Export fold ``k`` to ``fold<k>/model.onnx`` and check it (:func:`export_model`).

    Raises:
        WorkbenchError: a model with side features (n-gram bags / ID embeddings: not exported);
            see :func:`export_model`.
    """
    from core.modeling.features import features_on

    if features_on(run.cfg.features):
        raise WorkbenchError(
            f"{run.run_dir}: a model with side features (features.*) is not exported to ONNX; use --backend torch"
        )
    path = run.fold_dir(k) / ONNX_FILE
    return ExportedFold(
        k, path, *export_model(logits_module(_fold_torch_model(run, k)), batches, path, opset, threads, fuse)
    )


def _fold_torch_model(run: TrainedRun, k: int):
    """Fold ``k``'s CrossEncoder on CPU in eval mode (:func:`core.modeling.features.load_fold_model`)."""
    from core.modeling.markers import add_marker_tokens
    from core.modeling.model import load_tokenizer

    markers = add_marker_tokens(load_tokenizer(run.cfg.model.name), run.cfg.text)
    model, _, _ = fold_model(run, k, markers)
    return model


def export_fp16(run: TrainedRun, k: int, batches: list[dict]) -> ExportedFold:
    """GPU machines: ``fold<k>/model.fp16.onnx`` from ``model.onnx`` with ONNX Runtime's transformer
    optimiser (BERT fusions, then fp16 weights and compute, fp32 inputs/outputs), checked against
    torch within :data:`TOL_FP16`. Needs the CUDA execution provider; untested on this CPU machine.

    Raises:
        WorkbenchError: no CUDA execution provider, or the check fails (nothing written).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    from core.runs.lifecycle import atomic_write

    if "CUDAExecutionProvider" not in providers():
        raise WorkbenchError("--fp16 needs ONNX Runtime's CUDAExecutionProvider (a GPU machine with onnxruntime-gpu)")
    model = logits_module(_fold_torch_model(run, k))
    cfg = model.m.backbone.config
    path = run.fold_dir(k) / FP16_FILE
    diffs: list[tuple[float, float]] = []

    def write(tmp: Path) -> None:
        opt = optimize_model(
            str(run.fold_dir(k) / ONNX_FILE),
            model_type="bert",
            num_heads=cfg.num_attention_heads,
            hidden_size=cfg.hidden_size,
            use_gpu=True,
        )
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(tmp))
        d = compare(model, onnx_session(tmp), batches)
        diffs.append(d)
        if d[0] > TOL_FP16:
            raise WorkbenchError(f"{path}: fp16 differs from torch by {d[0]:.2e} > {TOL_FP16:.0e}; not written")

    atomic_write(path, write)
    return ExportedFold(k, path, *diffs[-1], fused=True)


def export_run(
    run: TrainedRun,
    data_dir: str | Path | None = None,
    opset: int = 17,
    fp16: bool = False,
    threads: int | None = None,
    fuse: bool = True,
    on_fold: Callable[[ExportedFold], None] | None = None,
) -> list[ExportedFold]:
    """Export every fold of ``run`` (:func:`export_fold`), checked on real pairs of ``data_dir``
    (default: the run's ``data.dir``; its first 2,000 rows are tokenized for the check batches).

    Returns:
        One :class:`ExportedFold` per fold, in fold order (``on_fold`` is called as each is done).

    Raises:
        DataError: the data cannot be read (one line naming it).
        WorkbenchError: see :func:`export_fold` / :func:`export_fp16`.
    """
    from core.data.esci import load_esci
    from core.data.text import encode_pairs
    from core.modeling.markers import add_marker_tokens
    from core.modeling.model import load_tokenizer

    cfg = run.cfg
    df = load_esci(data_dir or cfg.data.dir, task=cfg.data.task, locales=cfg.data.locales)
    tokenizer = load_tokenizer(cfg.model.name)
    add_marker_tokens(tokenizer, cfg.text)
    enc = encode_pairs(df if cfg.text.entity_markers else df.iloc[:2000].reset_index(drop=True), tokenizer, cfg.text)
    batches = check_batches(enc, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    out = []
    for k in run.folds:
        done = [export_fold(run, k, batches, opset, threads, fuse)]
        if fp16:
            done.append(export_fp16(run, k, batches))
        for res in done:
            out.append(res)
            if on_fold is not None:
                on_fold(res)
    return out


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of an fp32 graph (``onnxruntime.quantization.quantize_dynamic``:
    int8 weights of the MatMul/Gemm ops, activations quantised per batch at run time; Jacob et al.
    2018, arXiv:1712.05877), written atomically to ``dst``. A fused graph's contrib ops have no
    inferred output types: they are taken as float (``DefaultTensorType``). Faster on CPUs with
    VNNI, but not within 1e-4 of fp32: check the ranking before using it
    (benchmarks/predict_throughput.py)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from core.runs.lifecycle import atomic_write

    return atomic_write(
        Path(dst),
        lambda p: quantize_dynamic(
            str(src),
            str(p),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        ),
    )
