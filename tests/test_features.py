"""Multi-granular semantic units (hashed word n-gram bags) and ID embeddings (core.modeling.features)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import FeaturesConfig, config_from_dict
from core.errors import ConfigError
from core.modeling.features import (
    NgramBags,
    RowFeatures,
    SemanticUnits,
    build_id_vocab,
    build_semantic,
    check_features,
    compute_ngram_bags,
    encode_ids,
    load_fold_model,
    ngram_bags_cached,
    ngram_bucket,
    ngrams,
    text_buckets,
    train_word2vec,
    word2vec_bucket_init,
    words,
)
from core.modeling.model import CrossEncoder, collate, load_tokenizer
from test_tricks import _cfg as tricks_cfg

TEXTS = ["USB-C Cable, 6 ft &amp; <b>fast</b> charge", "zapatillas de running mujer", "ワイヤレスイヤホン", ""]


# ---- n-grams and hashing ------------------------------------------------------------------------------


def test_ngrams_of_a_known_string_are_word_uni_bi_trigrams():
    toks = words("USB-C Cable, 6ft &amp; <b>Fast</b>")
    assert toks == ["usb", "c", "cable", "6ft", "fast"]  # cleaned (HTML), lower-cased, \w+ words
    assert set(ngrams(toks[:4], 3)) == {
        "usb",
        "c",
        "cable",
        "6ft",
        "usb c",
        "c cable",
        "cable 6ft",
        "usb c cable",
        "c cable 6ft",
    }
    assert ngrams(["a", "b"], 3) == ["a", "b", "a b"]
    assert ngrams(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert words("one two three four", max_words=2) == ["one", "two"]
    # rows 1..buckets (0 = padding); one bucket per n-gram
    b = text_buckets(TEXTS[0], 3, 1000)
    assert len(b) == 7 + 6 + 5 and all(1 <= x <= 1000 for x in b)
    assert (
        text_buckets("", 3, 1000) == []
        and text_buckets(None, 3, 1000) == []
        and text_buckets(float("nan"), 3, 10) == []
    )


def test_hashing_is_deterministic_across_processes():
    here = {t: text_buckets(t, 3, 2**18) for t in TEXTS}
    code = (
        "import json, sys; from core.modeling.features import text_buckets; "
        f"print(json.dumps({{t: text_buckets(t, 3, 2**18) for t in {TEXTS!r}}}))"
    )
    for seed in ("1", "2"):  # str hash() differs between these two processes; our buckets must not
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=os.getcwd(),
        )
        assert json.loads(out.stdout) == here
    assert ngram_bucket("usb c", 2**18) == __import__("zlib").crc32(b"usb c") % 2**18 + 1
    with pytest.raises(ConfigError):
        ngram_bucket("x", 0)


def test_vectorised_bags_equal_the_per_row_hashing_and_cache(tmp_path, small_dataset):
    from core.data.esci import load_esci

    df = load_esci(small_dataset)
    df.loc[0, "product_description"] = None  # an empty field gives an empty bag
    cfg = FeaturesConfig(ngram_bags=True, buckets=5000, max_words=20)
    bags = compute_ngram_bags(df, cfg)
    assert len(bags) == len(df) and bags.fields == ["query", "bullet_point", "description"]
    cols = {"query": "query", "bullet_point": "product_bullet_point", "description": "product_description"}
    for i in [0, 1, 7, len(df) - 1]:
        for j, f in enumerate(bags.fields):
            assert bags.bag(i, j).tolist() == text_buckets(df[cols[f]].iloc[i], 3, 5000, 20), (i, f)
    assert len(bags.bag(0, 2)) == 0 and bags.lengths()[0, 2] == 0  # row 0's description
    # each distinct text once: a query shared by many rows is one segment
    assert bags.index.shape == (len(df), 3) and len(bags.offsets) - 1 < 3 * len(df)
    q_rows = np.flatnonzero(df["query"].to_numpy() == df["query"].iloc[1])
    assert len(q_rows) > 1 and len(set(bags.index[q_rows, 0].tolist())) == 1
    # product fields: one segment per (product_id, product_locale), the key the products are joined on
    key = df["product_id"].astype(str) + "/" + df["product_locale"].astype(str)
    assert bags.index[:, 1].max() + 1 - bags.index[:, 1].min() == key.nunique()
    assert (pd.Series(bags.index[:, 1]).groupby(key.to_numpy()).nunique() == 1).all()
    batch = bags.batch([0, 5, 3])
    assert batch.dtype == torch.int64 and batch.shape[:2] == (3, 3)
    assert (batch[0, 2] == 0).all()
    cached = ngram_bags_cached(df, cfg, tmp_path)
    again = ngram_bags_cached(df, cfg, tmp_path)  # read back from bags-<key>.npz
    assert len(list(tmp_path.glob("bags-*.npz"))) == 1
    np.testing.assert_array_equal(again.ids, bags.ids)
    np.testing.assert_array_equal(cached.offsets, bags.offsets)
    np.testing.assert_array_equal(again.index, bags.index)
    np.testing.assert_array_equal(again.batch([0, 5, 3]).numpy(), batch.numpy())


def test_empty_bag_gives_zeros_no_nan_and_a_finite_gradient():
    bags = NgramBags(
        ["query", "description"], np.array([3, 4, 3], np.int32), np.array([0, 3, 3]), np.array([[0, 1], [1, 1]])
    )
    mod = SemanticUnits(2, buckets=10, bag_dim=4)
    x = bags.batch([0, 1])  # row 0: description empty; row 1: both empty
    out = mod(x)
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    assert torch.equal(out[0, 4:], torch.zeros(4)) and torch.equal(out[1], torch.zeros(8))
    w = mod.bag.weight
    torch.testing.assert_close(out[0, :4], (2 * w[3] + w[4]) / 3)
    out.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.equal(w.grad[0], torch.zeros(4))


# ---- shapes ---------------------------------------------------------------------------------------------


def test_feature_shapes_and_classifier_input_dimension(small_dataset, tiny_bert):
    from core.config import TextConfig
    from core.data.esci import load_esci
    from core.data.text import encode_pairs

    df = load_esci(small_dataset).head(40).reset_index(drop=True)
    fc = FeaturesConfig(ngram_bags=True, id_embeddings=True, buckets=512, bag_dim=8, id_dim=4, id_min_count=1)
    vocab = build_id_vocab(df, fc.id_fields, fc.id_min_count)
    semantic = build_semantic(fc, vocab)
    assert semantic.out_dim == 8 * 3 + 4 * 3
    model = CrossEncoder.from_pretrained(str(tiny_bert), semantic=semantic)
    hidden = model.backbone.config.hidden_size
    assert model.head.in_features == hidden + 8 * 3 + 4 * 3
    feats = RowFeatures(compute_ngram_bags(df, fc), encode_ids(df, vocab))
    tok = load_tokenizer(str(tiny_bert))
    enc = encode_pairs(df, tok, TextConfig(max_length=32))
    batch = collate(enc, np.arange(6), tok.pad_token_id, feats)
    assert batch["bags"].shape[:2] == (6, 3) and batch["ids"].shape == (6, 3)
    assert semantic(batch["bags"], batch["ids"]).shape == (6, 8 * 3 + 4 * 3)  # (batch, bag_dim*F + id_dim*F_id)
    model.eval()
    assert model(**batch).shape == (6, 4)
    with pytest.raises(ValueError, match="bags"):
        model(batch["input_ids"], batch["attention_mask"])
    # features off: the plain batch and head
    assert set(collate(enc, np.arange(6), tok.pad_token_id)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert build_semantic(FeaturesConfig(), vocab) is None
    assert CrossEncoder.from_pretrained(str(tiny_bert)).head.in_features == hidden


# ---- ID vocabularies ------------------------------------------------------------------------------------


def test_id_vocab_rare_and_unknown_share_bucket_zero():
    train = pd.DataFrame(
        {
            "product_id": ["a", "b", "c", "d", "d", "e"],
            "product_locale": ["us", "us", "us", "us", "us", "es"],
            "product_brand": ["Acme", "acme ", "Zeta", "Acme", "Acme", None],  # d twice: counted once
            "product_color": ["red", "Red", "blue", "blue", "blue", ""],
        }
    )
    vocab = build_id_vocab(train, ["locale", "brand", "color"], min_count=2)
    assert vocab == {"locale": ["us"], "brand": ["acme"], "color": ["blue", "red"]}
    test = pd.DataFrame(
        {
            "product_locale": ["us", "jp", "es"],
            "product_brand": ["ACME", "Zeta", "Nobody"],
            "product_color": ["Red", None, "blue"],
        }
    )
    ids = encode_ids(test, vocab)
    assert ids.tolist() == [[1, 1, 2], [0, 0, 0], [0, 0, 1]]  # rare (Zeta: 1 product), unseen, empty -> 0
    with pytest.raises(ConfigError, match="id_fields"):
        build_id_vocab(train, ["size"])


# ---- config errors --------------------------------------------------------------------------------------


def test_bad_features_config_is_one_line_error_and_exit_2(tmp_path, monkeypatch):
    for bad, part in [
        ("features.bag_fields=[query,colour]", "bag_fields"),
        ("features.buckets=0", "buckets"),
        ("features.id_fields=[size]", "id_fields"),
        ("features.init=glove", "init"),
        ("features.ngram=0", "ngram"),
    ]:
        with pytest.raises(ConfigError, match=part) as info:
            config_from_dict({}, [bad])
        assert "\n" not in str(info.value)
    cfg = config_from_dict({}, ["features.ngram_bags=true", "features.init=word2vec"])
    monkeypatch.setitem(sys.modules, "gensim", None)  # as if gensim were not installed
    with pytest.raises(ConfigError, match="gensim"):
        check_features(cfg.features)
    monkeypatch.undo()
    (tmp_path / "c.yaml").write_text("name: x\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench",
            "train",
            str(tmp_path / "c.yaml"),
            "--db",
            str(tmp_path / "r.db"),
            "--set",
            "features.buckets=-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "features.buckets" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    code = (
        "import sys; sys.modules['gensim'] = None; sys.argv = ['workbench'] + sys.argv[1:]; "
        "from workbench.cli import main; main()"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            str(tmp_path / "c.yaml"),
            "--db",
            str(tmp_path / "r.db"),
            "--set",
            f"output_dir={tmp_path / 'runs'}",
            "--set",
            "features.ngram_bags=true",
            "--set",
            "features.init=word2vec",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "gensim" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


# ---- word2vec init --------------------------------------------------------------------------------------


def test_word2vec_init_bag_vector_is_the_mean_of_word_vectors(small_dataset):
    pytest.importorskip("gensim")
    from core.data.esci import load_esci

    df = load_esci(small_dataset)
    fc = FeaturesConfig(ngram_bags=True, buckets=2**16, bag_dim=8, init="word2vec", w2v_epochs=1, max_words=16)
    wv = train_word2vec(df, 8, epochs=1, seed=3)
    wv2 = train_word2vec(df, 8, epochs=1, seed=3)
    np.testing.assert_array_equal(wv.vectors, wv2.vectors)  # one worker, crc32 seeding: reproducible
    rows, vecs = word2vec_bucket_init(df, fc, wv=wv)
    assert vecs.shape == (len(rows), 8) and 0 not in rows
    # which distinct n-grams of the bag fields land in each bucket
    grams: dict[int, set[str]] = {}
    for col in ("query", "product_bullet_point", "product_description"):
        for t in pd.unique(df[col].astype("string").fillna("")):
            for g in ngrams(words(t, 16), 3):
                grams.setdefault(ngram_bucket(g, fc.buckets), set()).add(g)
    alone = lambda g: grams[ngram_bucket(g, fc.buckets)] == {g}  # noqa: E731
    q_words = [w for t in df["query"].unique() for w in words(t) if w in wv.key_to_index]
    word = next(w for w in q_words if alone(w))
    mod = SemanticUnits(1, fc.buckets, 8, bag_init=(rows, vecs))
    bag = torch.tensor([[[ngram_bucket(word, fc.buckets)]]])
    np.testing.assert_allclose(mod(bag)[0].detach().numpy(), wv[word], rtol=1e-6)  # a word's bag = its w2v vector
    bigram = next(
        g
        for t in df["query"].unique()
        for g in ngrams(words(t), 2)[len(words(t)) :]
        if alone(g) and all(w in wv.key_to_index for w in g.split())
    )
    a, b = bigram.split()
    np.testing.assert_allclose(
        mod.bag.weight[ngram_bucket(bigram, fc.buckets)].detach().numpy(), (wv[a] + wv[b]) / 2, rtol=1e-5, atol=1e-6
    )  # an n-gram's row = mean of its words
    shared = next(b_ for b_, gs in grams.items() if len(gs) > 1 and b_ in set(rows.tolist()))
    want = np.mean(
        [
            np.mean([wv[w] for w in g.split() if w in wv.key_to_index], 0)
            for g in grams[shared]
            if any(w in wv.key_to_index for w in g.split())
        ],
        0,
    )
    np.testing.assert_allclose(vecs[list(rows).index(shared)], want, rtol=1e-5, atol=1e-6)  # buckets averaged


# ---- adversaries leave the tables alone -----------------------------------------------------------------


def test_awp_and_fgm_do_not_perturb_the_feature_tables(tiny_bert):
    from core.modeling.features import PARAM_PREFIX
    from core.modeling.tricks import AWP, FGM

    model = CrossEncoder.from_pretrained(str(tiny_bert), semantic=SemanticUnits(2, 64, 4, {"brand": 3}, 2))
    ids = torch.randint(0, 50, (3, 8))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "bags": torch.randint(0, 65, (3, 2, 5)),
        "ids": torch.randint(0, 4, (3, 1)),
    }
    model(**batch).sum().backward()
    assert model.semantic.bag.weight.grad is not None
    awp = AWP(model, 1.0, 0.01, skip_prefixes=(PARAM_PREFIX,))  # as core.training.train builds it
    awp.save()
    assert awp.backup and not [n for n in awp.backup if n.startswith("semantic.")]
    assert "head.weight" in awp.backup
    awp.restore()
    assert not [n for n, _ in FGM(model).params if n.startswith("semantic.")]


# ---- end to end --------------------------------------------------------------------------------------------


def _cfg(tmp_path, data_dir, model_dir, features, **tricks):
    return tricks_cfg(tmp_path, data_dir, model_dir, features=features, **tricks)


def _reload_predictions(res, cfg, fold, rows):
    """Predict df rows with fold ``fold``'s saved checkpoint and features.json (a fresh process would)."""
    from core.data.text import encode_pairs_cached
    from core.training.fold_loop import predict_proba
    from core.training.validate import load_training_frame

    df = load_training_frame(cfg)
    tok = load_tokenizer(cfg.model.name)
    enc = encode_pairs_cached(df, tok, cfg.text)
    tk = cfg.tricks
    model, fc, vocab = load_fold_model(res.run_dir, fold, cfg.model.name, msd_rates=tk.msd_rates if tk.msd else None)
    feats = RowFeatures(
        compute_ngram_bags(df, fc) if fc.ngram_bags else None, encode_ids(df, vocab) if fc.id_embeddings else None
    )
    return df, predict_proba(model, enc, rows(df), 64, tok.pad_token_id, torch.device("cpu"), features=feats)


def test_training_with_both_features_and_tricks_writes_oof_test_and_reloadable_checkpoints(
    tmp_path, small_dataset, tiny_bert
):
    from core.runs.store import RunStore
    from core.training.train import run_training

    pytest.importorskip("gensim")
    store = RunStore(tmp_path / "runs.db")
    features = {
        "ngram_bags": True,
        "id_embeddings": True,
        "buckets": 4096,
        "bag_dim": 8,
        "id_dim": 4,
        "init": "word2vec",
        "w2v_epochs": 1,
    }
    cfg = _cfg(tmp_path, small_dataset, tiny_bert, features, ema=True, fgm=True, awp=True)
    cfg.train.save_checkpoints = True
    res = run_training(cfg, store)
    assert store.get_run(res.run_id)["status"] == "finished"
    assert {"train/adv_loss", "train/awp_loss", "cv/ndcg"} <= {m["name"] for m in store.metrics(res.run_id)}
    for name in (
        "oof.parquet",
        "test.parquet",
        "fold0/model.safetensors",
        "fold0/features.json",
        "fold1/features.json",
    ):
        assert (res.run_dir / name).is_file(), name
    oof = pd.read_parquet(res.run_dir / "oof.parquet")
    assert list(oof.columns) == [
        "example_id",
        "query_id",
        "product_id",
        "esci_label",
        "fold",
        "p_E",
        "p_S",
        "p_C",
        "p_I",
        "ce_score",
        "score",
    ]  # the format labels/ensemble code reads
    assert not oof[["p_E", "p_S", "p_C", "p_I"]].isna().any().any()
    saved = json.loads((res.run_dir / "fold0" / "features.json").read_text())
    assert saved["features"]["buckets"] == 4096 and set(saved["id_vocab"]) == {"locale", "brand", "color"}
    assert saved["id_vocab"]["locale"] == ["us"]
    kinds = {a["kind"] for a in store.artifacts(res.run_id)}
    assert "features" in kinds
    # fold 0's checkpoint + its saved vocabularies reproduce its OOF rows; all folds reproduce test.parquet
    fold0 = set(res.oof.loc[res.oof["fold"] == 0, "example_id"])
    df, probs = _reload_predictions(res, cfg, 0, lambda d: np.flatnonzero(d["example_id"].isin(fold0).to_numpy()))
    want = (
        res.oof.set_index("example_id")
        .loc[df.loc[df["example_id"].isin(fold0), "example_id"], ["p_E", "p_S", "p_C", "p_I"]]
        .to_numpy()
    )
    np.testing.assert_allclose(probs, want, atol=1e-5)
    test_rows = lambda d: np.flatnonzero((d["split"] == "test").to_numpy())  # noqa: E731
    mean = sum(_reload_predictions(res, cfg, k, test_rows)[1] for k in (0, 1)) / 2
    np.testing.assert_allclose(mean, res.test[["p_E", "p_S", "p_C", "p_I"]].to_numpy(), atol=1e-5)


def test_features_compose_with_the_other_tricks_and_a_teacher_pass(tmp_path, small_dataset, tiny_bert):
    from core.runs.store import RunStore
    from core.training.train import run_training

    store = RunStore(tmp_path / "runs.db")
    cfg = _cfg(
        tmp_path,
        small_dataset,
        tiny_bert,
        {
            "ngram_bags": True,
            "id_embeddings": True,
            "buckets": 1024,
            "bag_dim": 8,
            "id_dim": 4,
            "bag_fields": ["query", "title"],
        },
        rdrop=True,
        msd=True,
        mixup=True,
        layer_pooling=True,
        llrd=True,
        pgd=True,
        pgd_steps=2,
        self_distill=True,
        pseudo_label=True,
        pseudo_threshold=0.27,
    )
    res = run_training(cfg, store)
    assert store.get_run(res.run_id)["status"] == "finished"
    names = {m["name"] for m in store.metrics(res.run_id)}
    assert {"train/rdrop_kl", "train/adv_loss", "teacher/fold_ndcg", "tricks/pseudo_rows", "cv/ndcg"} <= names
    np.testing.assert_allclose(res.test[["p_E", "p_S", "p_C", "p_I"]].sum(axis=1), 1.0, atol=1e-5)


def test_features_off_checkpoint_is_the_plain_cross_encoder(tmp_path, small_dataset, tiny_bert):
    """Off (the default) changes nothing: no features.json, the plain head loads strictly and
    reproduces the OOF rows (bit-for-bit equality with the code before the features was checked
    by hand at commit time, see the README section)."""
    from safetensors.torch import load_file

    from core.runs.store import RunStore
    from core.training.train import run_training

    cfg = _cfg(tmp_path, small_dataset, tiny_bert, {}, ema=True, fgm=True)
    cfg.train.save_checkpoints = True
    res = run_training(cfg, RunStore(tmp_path / "runs.db"))
    assert not (res.run_dir / "fold0" / "features.json").exists()
    state = load_file(str(res.run_dir / "fold0" / "model.safetensors"))
    assert not [n for n in state if n.startswith("semantic.")]
    plain = CrossEncoder.from_pretrained(str(tiny_bert))
    plain.load_state_dict(state)  # strict: same keys and shapes as before the features existed
    fold0 = set(res.oof.loc[res.oof["fold"] == 0, "example_id"])
    df, probs = _reload_predictions(res, cfg, 0, lambda d: np.flatnonzero(d["example_id"].isin(fold0).to_numpy()))
    want = (
        res.oof.set_index("example_id")
        .loc[df.loc[df["example_id"].isin(fold0), "example_id"], ["p_E", "p_S", "p_C", "p_I"]]
        .to_numpy()
    )
    np.testing.assert_allclose(probs, want, atol=1e-5)
