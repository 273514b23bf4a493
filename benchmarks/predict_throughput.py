"""Prediction throughput: ``workbench predict`` (torch and ONNX Runtime) against sentence-transformers
``CrossEncoder.predict``.

Same model, same pairs, same max_length and batch size, one process, ``--threads`` intra-op threads
(default 2) for every contestant, run one after the other, each ``--repeats`` times (the median is
reported):

- the model: fold ``--fold`` of a finished run (``--run``, e.g. a demo run: all-MiniLM-L6-v2 with
  mean pooling and a 4-class head), or, without ``--run``, all-MiniLM-L6-v2 with a seeded random
  head (``configs/demo.yaml``'s template: max_length 48);
- the pairs: every example of ``--data`` (default: the real 150-query sample in the official
  layout, 6,678 pairs), tokenized with the run's template;
- ``torch``: the workbench path (:func:`core.inference.predict.score_pairs`: length-sorted
  batches of token ids, the CrossEncoder under ``torch.inference_mode``), tokenization included;
- ``onnx``: the same with the graph of ``workbench export onnx`` on ONNX Runtime (CPU provider,
  ``ORT_ENABLE_ALL``), tokenization included;
- ``onnx-int8`` (``--int8``): the graph after dynamic int8 quantisation
  (:func:`core.inference.onnx_export.quantize_int8`); reported, and flagged when its ranking is not
  identical;
- ``sentence-transformers``: ``CrossEncoder.predict(pairs, batch_size, apply_softmax=True)`` whose
  forward is the same CrossEncoder module (a ``BertForSequenceClassification`` cannot hold mean
  pooling; so the network and weights are identical), fed the text pairs decoded from our token
  ids (query; product fields with their ``[SEP]``), so it tokenizes them itself (its own time) to
  the same ids; the pairs whose re-tokenization differs are counted and printed.

Ranking identity: nDCG (Task 1 gains, all judged products of a query) of each contestant's expected
gain must equal ours (torch) to 4 decimals. Writes nothing outside a temporary folder.

    python benchmarks/predict_throughput.py [--run runs/<id>] [--data data/esci_us_150q] [--threads 2]
        [--batch-size 32] [--repeats 3] [--int8]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def interleaved(calls: dict, repeats: int) -> dict[str, tuple[float, float, object]]:
    """Run each callable ``repeats`` times, round-robin (so a load change on a shared machine hits
    every contestant alike) after one warm-up call each (``fn(warm=True)``: a few batches). Returns name -> (median wall seconds,
    median process CPU seconds (all threads), the last result)."""
    for fn in calls.values():
        fn(warm=True)  # warm-up on a few batches: thread pools, allocator, first-call caches
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            t, c = time.perf_counter(), time.process_time()
            last[name] = fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]), last[k]) for k in calls}


def load_model(args):
    """(RunConfig, CrossEncoder in eval mode) of ``--run`` fold ``--fold``, or MiniLM with a seeded head."""
    import torch

    from core.config import load_config
    from core.inference.predict import open_run
    from core.modeling.features import load_fold_model
    from core.modeling.model import CrossEncoder

    if args.run:
        run = open_run(args.run)
        cfg = run.cfg
        model, _, _ = load_fold_model(run.run_dir, args.fold, cfg.model.name, cfg.model.pooling, cfg.model.dropout)
        return cfg, model.eval()
    cfg = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(0)
    return cfg, CrossEncoder.from_pretrained(cfg.model.name, cfg.model.pooling, cfg.model.dropout).eval()


def st_pairs(enc, tokenizer, max_length: int) -> tuple[list[tuple[str, str]], int]:
    """Text pairs that tokenize back to our sequences: (decoded query, decoded product part with
    its inner [SEP]); returns them and how many re-tokenize to exactly our ids."""
    pairs, same = [], 0
    for i in range(len(enc)):
        ids, start = enc.get(i)
        a = tokenizer.decode(ids[1 : start - 1], clean_up_tokenization_spaces=False)
        b = tokenizer.decode(ids[start:-1], clean_up_tokenization_spaces=False)
        pairs.append((a, b))
        back = tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]
        same += back == ids.tolist()
    return pairs, same


def st_cross_encoder(model, cfg, max_length: int):
    """sentence-transformers' CrossEncoder over the backbone folder, its forward replaced by ``model``."""
    from sentence_transformers.cross_encoder import CrossEncoder as STCrossEncoder

    from core.modeling.model import resolve_model_path

    ce = STCrossEncoder(resolve_model_path(cfg.model.name), num_labels=4, max_length=max_length, device="cpu")

    def forward(self, features, **kwargs):
        logits = model(features["input_ids"], features["attention_mask"], features.get("token_type_ids"))
        return {**features, "scores": logits}

    ce.forward = types.MethodType(forward, ce)
    return ce.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a finished run folder (default: MiniLM with a random head)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", default=str(REPO / "data" / "esci_us_150q"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--int8", action="store_true", help="also dynamic int8 quantisation")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from core.data.esci import load_esci
    from core.data.text import encode_pairs
    from core.inference.onnx_export import (
        check_batches,
        export_model,
        logits_module,
        onnx_forward,
        onnx_session,
        quantize_int8,
    )
    from core.inference.predict import score_pairs, torch_forward
    from core.modeling.model import load_tokenizer
    from core.scoring.metrics import expected_gain, mean_ndcg

    cfg, model = load_model(args)
    L, B = cfg.text.max_length, args.batch_size
    df = load_esci(args.data, task=cfg.data.task)
    if args.limit:
        df = df.iloc[: args.limit].reset_index(drop=True)
    tok = load_tokenizer(cfg.model.name)
    pad = tok.pad_token_id or 0
    qids, labels = df["query_id"].to_numpy(), df["esci_label"].to_numpy()
    n = len(df)
    enc = encode_pairs(df, tok, cfg.text)
    tmp = Path(tempfile.mkdtemp(prefix="esci-predict-bench-"))
    wrapped = logits_module(model)
    d_export = export_model(wrapped, check_batches(enc, pad), tmp / "model.onnx", threads=args.threads)
    d_plain = export_model(wrapped, check_batches(enc, pad), tmp / "plain.onnx", threads=args.threads, fuse=False)
    runs: dict[str, tuple[float, float, float, np.ndarray]] = {}  # name -> (wall s, CPU s, model-only s, probs)

    def ours(forward, warm: bool = False):
        frame = df.iloc[: 4 * B] if warm else df
        t0 = time.perf_counter()
        e = encode_pairs(frame, tok, cfg.text)
        t1 = time.perf_counter()
        return score_pairs(forward, e, B, pad), t1 - t0

    sess = onnx_session(tmp / "model.onnx", threads=args.threads)
    contestants = {
        "workbench torch": torch_forward(model),
        "workbench onnx (plain graph)": onnx_forward(onnx_session(tmp / "plain.onnx", threads=args.threads)),
        "workbench onnx": onnx_forward(sess),
    }
    if args.int8:
        quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
        contestants["workbench onnx-int8"] = onnx_forward(onnx_session(tmp / "model.int8.onnx", threads=args.threads))
    pairs, same = st_pairs(enc, tok, L)
    ce = st_cross_encoder(model, cfg, L)
    kw = {"batch_size": B, "apply_softmax": True, "show_progress_bar": False, "convert_to_numpy": True}
    calls = {name: (lambda warm=False, f=fwd: ours(f, warm)) for name, fwd in contestants.items()}
    calls["sentence-transformers"] = lambda warm=False: (
        np.asarray(ce.predict(pairs[: 4 * B] if warm else pairs, **kw), dtype=np.float32),
        float("nan"),
    )
    for name, (sec, cpu_s, (probs, tok_s)) in interleaved(calls, args.repeats).items():
        runs[name] = (sec, cpu_s, sec - tok_s, probs)

    ref = runs["workbench torch"][3]
    base = runs["sentence-transformers"][0]
    ndcg_ref = mean_ndcg(qids, expected_gain(ref), labels)
    print(
        f"\n{n} pairs ({len(np.unique(qids))} queries) of {args.data}, max_length {L}, batch {B}, {args.threads} threads, median of {args.repeats} interleaved runs; "
        f"model: {args.run + f' fold {args.fold}' if args.run else cfg.model.name + ' (random head)'}"
    )
    for what, d in (("fused" if d_export[2] else "plain (fusion failed)", d_export), ("plain", d_plain)):
        print(
            f"ONNX export check ({what} graph): max abs diff vs torch {d[0]:.2e} (probabilities), {d[1]:.2e} (logits)"
        )
    print(f"sentence-transformers input: {same} of {n} pairs re-tokenize to exactly our ids")
    print(f"mean tokens per pair {enc.lengths.mean():.1f}, max {enc.lengths.max()}\n")
    print(
        "| contestant | wall s | CPU s | model s | pairs/s | x vs ST (wall) | x vs ST (CPU) | nDCG | max abs dp vs torch "
        "| ranking = torch (4 dp) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cpu_base = runs["sentence-transformers"][1]
    for name, (sec, cpu_s, model_s, probs) in runs.items():
        nd = mean_ndcg(qids, expected_gain(probs), labels)
        dp = float(np.abs(probs - ref).max())
        print(
            f"| {name} | {sec:.2f} | {cpu_s:.2f} | {model_s:.2f} | {n / sec:.0f} | {base / sec:.2f} | "
            f"{cpu_base / cpu_s:.2f} | {nd:.6f} | {dp:.1e} | "
            f"{'yes' if round(nd, 4) == round(ndcg_ref, 4) else 'NO'} |"
        )


if __name__ == "__main__":
    main()
