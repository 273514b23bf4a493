"""Typed field markers, typed entity markers (gazetteer) and ``model.pooling: markers`` (issue 15).

Text side: core.data.text (template, budgets, gazetteer, cache key); model side:
core.modeling.markers (special tokens, resized embeddings, offsets when frozen, marker pooling);
end to end: a tiny training run with both markers and marker pooling, killed in fold 1 and resumed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from core.config import RunConfig, TextConfig, load_config
from core.data.text import build_gazetteer, encode_pairs, encode_pairs_cached
from core.errors import ConfigError
from core.modeling.markers import add_marker_tokens, marker_pool, resize_for_markers
from core.runs.store import RunStore

PROBS = ["p_E", "p_S", "p_C", "p_I"]


@pytest.fixture()
def tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def _frame(query="kitchen towels", color="white", desc="kitchen towels " * 50, n=2):
    return pd.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(n)],
            "query": [query] * n,
            "product_title": ["cotton towel set"] * n,
            "product_brand": ["acme"] * n,
            "product_color": [color] * n,
            "product_bullet_point": ["soft and absorbent"] * n,
            "product_description": [desc] * n,
        }
    )


def _tokens(tok, enc, i=0):
    ids, start = enc.get(i)
    return tok.convert_ids_to_tokens(ids.tolist()), start


# ---- text side -----------------------------------------------------------------------------------------------


def test_field_markers_precede_each_field_in_template_order(tok):
    cfg = TextConfig(max_length=40, field_markers=True)
    add_marker_tokens(tok, cfg)
    toks, start = _tokens(tok, encode_pairs(_frame(), tok, cfg))
    assert toks[:2] == ["[CLS]", "[QUERY]"] and toks[start - 1] == "[SEP]"
    assert tok.convert_tokens_to_string(toks[2 : start - 1]) == "kitchen towels"
    assert len(toks) == 40 and toks[-1] == "[SEP]"  # the long description fills the room exactly
    text = tok.convert_tokens_to_string(toks[start:])
    assert text.startswith(
        "[TITLE] cotton towel set [SEP] [BRAND] acme [COLOR] white [BULLET] soft and absorbent [DESC] kitchen towels"
    ), text
    assert " / " not in text  # the markers replace the plain template's separators
    # the plain template, same budgets: 6 markers instead of 3 "/" -> 3 description tokens fewer
    plain, _ = _tokens(tok, encode_pairs(_frame(), tok, TextConfig(max_length=40)))
    assert len(plain) == 40 and plain.count("/") == 3
    desc = len(toks) - 1 - toks.index("[DESC]") - 1
    plain_desc = len(plain) - 1 - (len(plain) - 1 - plain[::-1].index("/")) - 1
    assert desc == plain_desc - 3 > 0


def test_markers_are_overhead_within_max_length_and_absent_for_empty_fields(tok):
    add_marker_tokens(tok, TextConfig(field_markers=True))
    df = _frame(color="", desc="")
    for max_length in (8, 9, 12, 16, 24, 48):
        cfg = TextConfig(max_length=max_length, field_markers=True)
        toks, start = _tokens(tok, encode_pairs(df, tok, cfg))
        assert len(toks) <= max_length and toks[0] == "[CLS]" and toks[-1] == "[SEP]", (max_length, toks)
        assert toks[1] == "[QUERY]" and "[COLOR]" not in toks and "[DESC]" not in toks
        for marker in ("[TITLE]", "[BRAND]", "[BULLET]"):  # a marker is never left without its field's text
            if marker in toks:
                j = toks.index(marker)
                assert j + 1 < len(toks) and toks[j + 1] not in ("[SEP]", "[BRAND]", "[BULLET]"), toks
    # a roomy sequence: query and title keep their budgets; the markers are not taken from them
    cfg = TextConfig(max_length=64, field_markers=True, budgets={"query": 2, "title": 2, "brand": 1})
    toks, start = _tokens(tok, encode_pairs(_frame(color="", desc=""), tok, cfg))
    assert toks[: start + 1] == ["[CLS]", "[QUERY]", "kitchen", "towels", "[SEP]", "[TITLE]"]


def test_gazetteer_multiword_longest_case_and_whole_words():
    products = pd.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(8)],
            "product_brand": ["Under Armour", "Armour", "NIKE", "HP", "Generic", "Red Wing", "nike", "No Brand"],
            "product_color": ["Black", "Red", "Navy Blue", "Blue", "", "Orange", "black", "1234"],
            "product_title": ["a shoe", "a coat", "a cap", "a laptop", "a mug", "a boot", "a sock", "a pen"],
        }
    )
    gaz = build_gazetteer(products)
    assert gaz.mark("Under Armour black hoodie") == "[BRAND] Under Armour [/BRAND] [COLOR] black [/COLOR] hoodie"
    assert gaz.mark("armour plates") == "[BRAND] armour [/BRAND] plates"  # the shorter entry on its own
    assert gaz.mark("red wing boots in navy blue") == "[BRAND] red wing [/BRAND] boots in [COLOR] navy blue [/COLOR]"
    assert gaz.mark("redwood nikes blueberry") == "redwood nikes blueberry"  # no partial-word hits
    assert gaz.mark("hp generic no brand 1234") == "hp generic no brand 1234"  # short, placeholder, no letter
    assert gaz.mark("NIKE") == "[BRAND] NIKE [/BRAND]"


def test_gazetteer_drops_words_in_many_titles_and_types_by_majority():
    n = 10
    products = pd.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(n)],
            "product_brand": ["Premium"] + ["Orange"] * 2 + ["Zest"] * (n - 3),
            "product_color": ["Orange"] * 3 + ["Green"] * (n - 3),
            "product_title": ["premium towel"] * 3 + ["plain towel"] * (n - 3),  # "premium" in 30% of titles
        }
    )
    gaz = build_gazetteer(products)
    assert gaz.find("premium towel") == []  # a word that common in titles is no entity cue
    assert gaz.find("orange zest") == [(0, 6, "color"), (7, 11, "brand")]  # 3 colour rows vs 2 brand rows


def test_entity_markers_wrap_query_mentions_and_count_against_the_query_budget(tok):
    cfg = TextConfig(max_length=48, entity_markers=True)
    add_marker_tokens(tok, cfg)
    df = _frame(query="acme white kitchen towels")
    toks, start = _tokens(tok, encode_pairs(df, tok, cfg))
    query = tok.convert_tokens_to_string(toks[1 : start - 1])
    assert query == "[BRAND] acme [/BRAND] [COLOR] white [/COLOR] kitchen towels"
    assert "[/BRAND]" not in toks[start:]  # only the query is marked
    # a budget that cuts inside a mention: its opening marker goes, no mention is left open
    acme = tok.tokenize("acme")  # word pieces
    for budget, want in ((len(acme) + 4, ["[BRAND]", *acme, "[/BRAND]", "white"]), (len(acme) + 1, acme)):
        cfg = TextConfig(max_length=48, entity_markers=True, budgets={**TextConfig().budgets, "query": budget})
        toks, start = _tokens(tok, encode_pairs(df, tok, cfg))
        assert toks[1 : start - 1] == want, budget


def test_cache_key_separates_marker_and_plain_encodings(tok, tmp_path):
    add_marker_tokens(tok, TextConfig(field_markers=True, entity_markers=True))  # one tokenizer for all
    df = _frame(query="acme towels")
    plain = TextConfig(max_length=32, cache_dir=str(tmp_path))

    def stores():
        return {p.name for p in tmp_path.iterdir()}

    a = encode_pairs_cached(df, tok, plain).materialize()
    assert len(stores()) == 6  # the query and the five fields
    b = encode_pairs_cached(df, tok, TextConfig(max_length=32, cache_dir=str(tmp_path), field_markers=True))
    assert len(stores()) == 6  # field markers are placed per pair: the same token stores
    c = encode_pairs_cached(df, tok, TextConfig(max_length=32, cache_dir=str(tmp_path), entity_markers=True))
    assert [n.split("-")[0] for n in stores()].count("query") == 2  # marked queries: their own store
    b, c = b.materialize(), c.materialize()
    marker_ids = set(tok.convert_tokens_to_ids(["[QUERY]", "[TITLE]", "[BRAND]", "[/BRAND]"]))
    assert not marker_ids & set(a.input_ids.tolist())
    assert {"[QUERY]", "[TITLE]"} <= set(tok.convert_ids_to_tokens(b.input_ids.tolist()))
    assert "[/BRAND]" in tok.convert_ids_to_tokens(c.input_ids.tolist())
    again = encode_pairs_cached(df, tok, plain)  # a hit: the plain query store, not the marked one
    np.testing.assert_array_equal(again.materialize().input_ids, a.input_ids)
    assert len(stores()) == 7


# ---- model side ----------------------------------------------------------------------------------------------


def _model(tiny_bert, spec, pooling="mean", frozen=False):
    from core.modeling.model import CrossEncoder

    torch.manual_seed(0)
    slots = (spec.slot_ids, spec.slot_segments) if pooling == "markers" else None
    model = CrossEncoder.from_pretrained(str(tiny_bert), pooling, 0.0, marker_slots=slots)
    resize_for_markers(model, spec, trainable_offsets=frozen)
    if frozen:
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    return model


def test_marker_rows_start_from_their_name_words_and_learn_through_offsets_when_frozen(tok, tiny_bert):
    from core.modeling.model import collate

    spec = add_marker_tokens(tok, TextConfig(field_markers=True, entity_markers=True))
    assert len(spec.new_ids) == 8
    model = _model(tiny_bert, spec, frozen=True)
    w = model.backbone.get_input_embeddings().weight
    assert w.shape[0] == len(tok)
    title = tok("title", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(w[tok.convert_tokens_to_ids("[TITLE]")], w[title].mean(0))
    end_brand = tok("end brand", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(w[tok.convert_tokens_to_ids("[/BRAND]")], w[end_brand].mean(0))
    # frozen table: only the offsets (outside backbone.*: head_lr) carry the markers' gradient
    enc = encode_pairs(_frame(query="acme towels"), tok, TextConfig(max_length=32, field_markers=True))
    batch = collate(enc, [0, 1], tok.pad_token_id)
    model(**batch).sum().backward()
    assert w.grad is None
    grad = model.marker_offsets.weight.grad
    used = [spec.new_ids.index(tok.convert_tokens_to_ids(t)) for t in ("[QUERY]", "[TITLE]", "[DESC]")]
    assert all(grad[j].abs().sum() > 0 for j in used)
    assert grad[spec.new_ids.index(tok.convert_tokens_to_ids("[/COLOR]"))].abs().sum() == 0  # not in the batch


def test_marker_pooling_width_slots_and_zeros_for_missing_fields(tok, tiny_bert):
    from core.modeling.model import collate

    cfg = TextConfig(max_length=48, field_markers=True, entity_markers=True)
    spec = add_marker_tokens(tok, cfg)
    assert len(spec.slot_ids) == 6
    model = _model(tiny_bert, spec, pooling="markers").eval()
    hidden = model.backbone.config.hidden_size
    assert model.head.in_features == 6 * hidden
    df = pd.concat([_frame(query="acme towels", n=1), _frame(query="acme towels", color="", n=1)], ignore_index=True)
    enc = encode_pairs(df, tok, cfg)
    batch = collate(enc, [0, 1], tok.pad_token_id)
    with torch.no_grad():
        pooled = model.features(**batch)
        states = model.backbone(**batch).last_hidden_state
    assert pooled.shape == (2, 6 * hidden)
    ids = batch["input_ids"][1].tolist()
    brand = tok.convert_tokens_to_ids("[BRAND]")
    assert ids.count(brand) == 2  # the query's entity marker and the brand field's marker
    field_pos = max(i for i, t in enumerate(ids) if t == brand)
    torch.testing.assert_close(pooled[1, 2 * hidden : 3 * hidden], states[1, field_pos])  # slot 2 = brand field
    torch.testing.assert_close(pooled[1, :hidden], states[1, 1])  # slot 0 = [QUERY] at position 1
    assert torch.count_nonzero(pooled[1, 3 * hidden : 4 * hidden]) == 0  # no colour in row 1: zeros
    assert torch.count_nonzero(pooled[0, 3 * hidden : 4 * hidden]) > 0
    # without the segments the brand slot would read the query's entity marker (first occurrence)
    unsegmented = marker_pool(states, batch["input_ids"], None, model.slot_ids, model.slot_segments)
    entity_pos = ids.index(brand)
    assert entity_pos < field_pos
    torch.testing.assert_close(unsegmented[1, 2 * hidden : 3 * hidden], states[1, entity_pos])


def test_markers_pooling_without_field_markers_is_refused_before_a_run_exists(tmp_path, small_dataset, tiny_bert):
    from core.training.train import run_training
    from core.training.validate import check_run_config

    cfg = RunConfig()
    cfg.model.pooling = "markers"
    with pytest.raises(ConfigError, match="model.pooling=markers needs text.field_markers") as info:
        check_run_config(cfg)
    assert "\n" not in str(info.value)
    cfg.text.field_markers = True
    check_run_config(cfg)  # with the markers it passes
    path = tiny_config(tmp_path, small_dataset, tiny_bert)
    bad = load_config(path, ["model.pooling=markers"])
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(ConfigError, match="text.field_markers"):
        run_training(bad, store)
    assert store.list_runs() == [] and not (tmp_path / "runs").exists()


# ---- end to end ----------------------------------------------------------------------------------------------


def _marker_config(tmp_path: Path, data_dir: Path, model_dir: Path, cache: Path) -> str:
    import yaml

    path = tiny_config(tmp_path, data_dir, model_dir, cache=cache, folds=2, lr=1e-3, checkpoint_every=3, num_threads=1)
    data = yaml.safe_load(Path(path).read_text())
    data["text"].update(field_markers=True, entity_markers=True)
    data["model"].update(pooling="markers", freeze_embeddings=True)
    data["train"]["save_checkpoints"] = True
    Path(path).write_text(yaml.safe_dump(data))
    return path


def test_tiny_run_with_markers_finishes_reloads_and_resumes_to_the_same_oof(
    tmp_path, small_dataset, tiny_bert, monkeypatch
):
    from safetensors.torch import load_file

    import core.training.fold_loop as fold_loop
    from core.data.text import encode_pairs_cached
    from core.modeling.features import load_fold_model
    from core.modeling.model import load_tokenizer
    from core.runs.launcher import resume_config
    from core.training.train import run_training
    from core.training.validate import load_training_frame

    cache = tmp_path / "cache"
    ref_dir, run_dir_root = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir()
    run_dir_root.mkdir()
    ref_store = RunStore(ref_dir / "runs.db")
    cfg = load_config(_marker_config(ref_dir, small_dataset, tiny_bert, cache))
    ref = run_training(cfg, ref_store)
    assert np.isfinite(ref.cv["ndcg"]) and ref.test is not None
    assert "marker tokens added" in (ref.run_dir / "train.log").read_text()

    # the saved fold checkpoint reloads (resized first) and predicts the fold's own test probabilities
    state = load_file(str(ref.run_dir / "fold0" / "model.safetensors"))
    assert state["head.weight"].shape[1] == 6 * 32
    assert state["marker_offsets.weight"].abs().sum() > 0  # the frozen table's markers learned
    df = load_training_frame(cfg)
    tok = load_tokenizer(cfg.model.name)
    spec = add_marker_tokens(tok, cfg.text)
    enc = encode_pairs_cached(df, tok, cfg.text)
    model, _, _ = load_fold_model(ref.run_dir, 0, cfg.model.name, pooling="markers", markers=spec)
    test_rows = np.flatnonzero((df["split"] == "test").to_numpy())
    probs = fold_loop.predict_proba(model, enc, test_rows, 64, tok.pad_token_id, torch.device("cpu"))
    saved = pd.read_parquet(ref.run_dir / "fold0" / "test.parquet")
    np.testing.assert_allclose(probs, saved[PROBS].to_numpy(), atol=1e-5)

    # the same run killed in fold 1 after a step checkpoint, then resumed: the same OOF, bit for bit
    class Crash(BaseException):
        pass

    real = fold_loop.check_stop

    def crash_in_fold_1(where="", **kwargs):
        if where == "fold 1 step 4":
            raise Crash("simulated kill")
        real(where, **kwargs)

    store = RunStore(run_dir_root / "runs.db")
    monkeypatch.setattr(fold_loop, "check_stop", crash_in_fold_1)
    with pytest.raises(Crash):
        run_training(load_config(_marker_config(run_dir_root, small_dataset, tiny_bert, cache)), store)
    monkeypatch.setattr(fold_loop, "check_stop", real)
    run = store.list_runs()[0]
    crashed_dir = Path(run["run_dir"])
    assert (crashed_dir / "fold1" / "resume.pt").is_file() and (crashed_dir / "fold0" / "result.json").is_file()
    run_id, rcfg = resume_config(store, run["id"])
    assert rcfg.model.pooling == "markers" and rcfg.text.field_markers and rcfg.text.entity_markers
    res = run_training(rcfg, store, run_id=run_id, resume=True)
    assert store.get_run(run_id)["status"] == "finished"
    assert "fold 1 resumed from resume.pt" in (crashed_dir / "train.log").read_text()
    np.testing.assert_array_equal(res.oof[PROBS].to_numpy(), ref.oof[PROBS].to_numpy())
    np.testing.assert_array_equal(res.test[PROBS].to_numpy(), ref.test[PROBS].to_numpy())
    rows = Counter((m["name"], m["fold"], m["step"]) for m in store.metrics(run_id))
    assert rows == Counter((m["name"], m["fold"], m["step"]) for m in ref_store.metrics(ref.run_id))
