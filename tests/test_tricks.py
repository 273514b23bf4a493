"""The mathematics of each training technique (core.modeling.tricks) on tiny models against hand computations,
and the techniques composed in real k-fold runs of a tiny BERT on real ESCI queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr, softmax
from torch import nn

from core.config import config_from_dict, load_config
from core.errors import ConfigError
from core.modeling.model import CrossEncoder, WeightedLayerPooling, collate, load_tokenizer
from core.modeling.tricks import (
    AWP,
    EMA,
    FGM,
    PGD,
    classification_loss,
    distill_targets,
    draw_mixup,
    layer_index,
    mixup,
    one_hot,
    param_groups,
    parse_class_weights,
    rdrop_kl,
    select_pseudo_labels,
    smooth_targets,
)

LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 1.0, 2.5]])
LABELS = torch.tensor([0, 3, 1])


# ---- losses -------------------------------------------------------------------------------------


def test_poly1_is_ce_plus_epsilon_times_one_minus_pt_by_hand():
    p = softmax(LOGITS.numpy().astype(np.float64), axis=1)
    p_t = p[np.arange(3), LABELS.numpy()]
    ce = -np.log(p_t)
    for eps in (0.0, 1.0, 2.5, -0.5):
        want = np.mean(ce + eps * (1 - p_t))
        got = classification_loss(LOGITS, one_hot(LABELS), "poly1", poly1_epsilon=eps)
        assert float(got) == pytest.approx(want, rel=1e-5)
    # epsilon 0 is exactly CE, which equals torch's cross_entropy on hard labels
    assert float(classification_loss(LOGITS, one_hot(LABELS), "ce")) == pytest.approx(
        float(F.cross_entropy(LOGITS, LABELS)), rel=1e-6
    )


def test_focal_loss_by_hand_and_gamma_zero_is_ce():
    p = softmax(LOGITS.numpy().astype(np.float64), axis=1)
    p_t = p[np.arange(3), LABELS.numpy()]
    want = np.mean(-((1 - p_t) ** 2) * np.log(p_t))
    assert float(classification_loss(LOGITS, one_hot(LABELS), "focal", focal_gamma=2.0)) == pytest.approx(
        want, rel=1e-5
    )
    assert float(classification_loss(LOGITS, one_hot(LABELS), "focal", focal_gamma=0.0)) == pytest.approx(
        float(F.cross_entropy(LOGITS, LABELS)), rel=1e-6
    )
    # the focal loss down-weights the easy example more than the hard one
    easy = classification_loss(LOGITS[:1], one_hot(LABELS[:1]), "focal") / classification_loss(
        LOGITS[:1], one_hot(LABELS[:1])
    )
    hard = classification_loss(LOGITS[1:2], one_hot(LABELS[1:2]), "focal") / classification_loss(
        LOGITS[1:2], one_hot(LABELS[1:2])
    )
    assert easy < hard < 1


def test_label_smoothing_and_class_weights_match_torch():
    assert torch.allclose(smooth_targets(one_hot(LABELS), 0.1)[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    got = classification_loss(LOGITS, one_hot(LABELS), "ce", label_smoothing=0.1)
    assert float(got) == pytest.approx(float(F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1)), rel=1e-6)
    w = parse_class_weights([1.0, 2.0, 3.0, 0.5])
    got = classification_loss(LOGITS, one_hot(LABELS), "ce", class_weights=w)
    assert float(got) == pytest.approx(float(F.cross_entropy(LOGITS, LABELS, weight=w)), rel=1e-6)
    for bad in ([1, 2, 3], [1, -1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ConfigError, match="class_weights"):
            parse_class_weights(bad)
    with pytest.raises(ConfigError, match="tricks.loss"):
        classification_loss(LOGITS, one_hot(LABELS), "ghm")
    with pytest.raises(ConfigError, match="label_smoothing"):
        smooth_targets(one_hot(LABELS), 1.0)


def test_soft_targets_loss_is_the_expected_ce():
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    p = softmax(LOGITS[:1].numpy().astype(np.float64), axis=1)
    want = -(q.numpy() * np.log(p)).sum()
    assert float(classification_loss(LOGITS[:1], q, "ce")) == pytest.approx(want, rel=1e-6)


def test_rdrop_kl_symmetric_zero_for_identical_and_by_hand():
    a, b = LOGITS, LOGITS.flip(0) * 0.7
    assert float(rdrop_kl(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(rdrop_kl(a, b)) == pytest.approx(float(rdrop_kl(b, a)), rel=1e-6)
    pa = softmax(a.numpy().astype(np.float64), axis=1)
    pb = softmax(b.numpy().astype(np.float64), axis=1)
    want = np.mean(0.5 * (rel_entr(pa, pb).sum(1) + rel_entr(pb, pa).sum(1)))
    assert float(rdrop_kl(a, b)) == pytest.approx(want, rel=1e-5)
    assert float(rdrop_kl(a, b)) > 0


# ---- soft labels, mixup ----------------------------------------------------------------------------


def test_distill_targets_and_pseudo_label_selection():
    oof = np.array([[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    got = distill_targets(oof, np.array([0, 1]), 0.3)
    np.testing.assert_allclose(got, [[0.3 * 0.6 + 0.7, 0.06, 0.03, 0.03], [0.03, 0.03 + 0.7, 0.03, 0.21]], rtol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        distill_targets(np.full((2, 4), np.nan), np.array([0, 1]))
    with pytest.raises(ConfigError, match="distill_weight"):
        distill_targets(oof, np.array([0, 1]), 1.5)
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.69, 0.11, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    assert select_pseudo_labels(probs, 0.7).tolist() == [True, False, True]  # >= threshold, inclusive


def test_mixup_mixes_vectors_and_targets_with_the_same_lambda():
    x = torch.arange(12.0).view(3, 4)
    q = one_hot(torch.tensor([0, 1, 2]))
    perm = torch.tensor([2, 0, 1])
    xm, qm = mixup(x, q, 0.25, perm)
    assert torch.allclose(xm[0], 0.25 * x[0] + 0.75 * x[2])
    assert torch.allclose(qm[0], torch.tensor([0.25, 0.0, 0.75, 0.0]))
    lam1, p1 = draw_mixup(8, 0.4, np.random.default_rng(3))
    lam2, p2 = draw_mixup(8, 0.4, np.random.default_rng(3))
    assert lam1 == lam2 and torch.equal(p1, p2) and 0 < lam1 < 1 and sorted(p1.tolist()) == list(range(8))
    lams = [draw_mixup(2, 0.4, np.random.default_rng(s))[0] for s in range(400)]
    assert np.mean(lams) == pytest.approx(0.5, abs=0.05)  # Beta(a, a) has mean 1/2
    with pytest.raises(ConfigError):
        draw_mixup(4, 0.0, np.random.default_rng(0))


# ---- EMA ---------------------------------------------------------------------------------------------


def test_ema_value_after_n_steps_by_hand():
    model = nn.Linear(1, 1, bias=False)
    values = [1.0, 3.0, -2.0, 5.0]
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    want = 0.0
    for v in values:
        want = 0.9 * want + 0.1 * v
    assert float(ema.shadow["weight"]) == pytest.approx(want, rel=1e-6)  # 0.9^4*0 + sum 0.1*0.9^(n-i) v_i
    # the warm-up decay min(decay, (1 + t) / (10 + t)): 0.1, 2/11, 3/12, ...
    ema = EMA(model, decay=0.999)
    ds = []
    for _ in range(3):
        ds.append(ema.current_decay())
        ema.update(model)
    assert ds == pytest.approx([0.1, 2 / 11, 3 / 12])


def test_ema_applied_swaps_in_and_restores_exactly(tiny_bert):
    torch.manual_seed(0)
    model = CrossEncoder.from_pretrained(str(tiny_bert))
    ema = EMA(model, 0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    ema.update(model)
    with ema.applied(model) as m:
        for n, t in m.state_dict().items():
            if t.is_floating_point():
                assert torch.allclose(t, ema.shadow[n])
        assert not torch.equal(m.head.weight, trained["head.weight"])
    for n, t in model.state_dict().items():
        assert torch.equal(t, trained[n]), n


# ---- adversarial training on a tiny BERT over real queries ------------------------------------


@pytest.fixture(scope="module")
def tiny_batch(tiny_bert, sample_frames):
    from core.config import TextConfig
    from core.data.text import encode_pairs

    ex, pr = sample_frames
    df = ex.head(12).merge(pr, on=["product_id", "product_locale"], how="left")
    tok = load_tokenizer(str(tiny_bert))
    enc = encode_pairs(df, tok, TextConfig(max_length=32))
    batch = collate(enc, np.arange(len(df)), tok.pad_token_id)
    labels = torch.tensor(df["esci_label"].map({"E": 0, "S": 1, "C": 2, "I": 3}).to_numpy())
    return batch, labels


def _model(tiny_bert, **kw):
    torch.manual_seed(0)
    m = CrossEncoder.from_pretrained(str(tiny_bert), dropout=0.0, **kw)
    m.eval()  # deterministic forward passes (the backbone's dropout off); gradients still flow
    return m


def _loss(model, batch, labels):
    return lambda: F.cross_entropy(model(**batch), labels)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fgm_perturbation_has_norm_epsilon_and_embeddings_are_restored(tiny_bert, tiny_batch):
    batch, labels = tiny_batch
    model = _model(tiny_bert)
    emb = model.backbone.embeddings.word_embeddings.weight
    before = emb.detach().clone()
    _loss(model, batch, labels)().backward()
    g = emb.grad.clone()
    fgm = FGM(model, epsilon=0.5)
    assert fgm.attack() == pytest.approx(0.5, rel=1e-5)
    r = emb.detach() - before
    assert float(torch.linalg.vector_norm(r)) == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(r, 0.5 * g / torch.linalg.vector_norm(g), atol=1e-6)
    # only the rows of the batch's tokens moved
    moved = set(torch.nonzero(r.abs().sum(1)).flatten().tolist())
    assert moved <= set(batch["input_ids"].unique().tolist())
    fgm.restore()
    assert torch.equal(emb.detach(), before)


def test_fgm_adds_the_adversarial_gradient_to_the_clean_one(tiny_bert, tiny_batch):
    batch, labels = tiny_batch
    model = _model(tiny_bert)
    loss = _loss(model, batch, labels)
    loss().backward()
    clean = _grads(model)
    # the adversarial gradient computed by hand: perturb, backward alone, restore
    emb = model.backbone.embeddings.word_embeddings.weight
    with torch.no_grad():
        r = 0.5 * emb.grad / torch.linalg.vector_norm(emb.grad)
    model.zero_grad()
    with torch.no_grad():
        emb.add_(r)
    loss().backward()
    adv = _grads(model)
    with torch.no_grad():
        emb.sub_(r)
    model.zero_grad()
    loss().backward()
    FGM(model, 0.5).backward_adversarial(loss, lambda x: x.backward())
    for n, p in model.named_parameters():
        if n in clean:
            assert torch.allclose(p.grad, clean[n] + adv[n], atol=1e-5), n


def test_pgd_stays_in_the_epsilon_ball_and_restores_exactly(tiny_bert, tiny_batch):
    batch, labels = tiny_batch
    model = _model(tiny_bert)
    emb = model.backbone.embeddings.word_embeddings.weight
    before = emb.detach().clone()
    loss = _loss(model, batch, labels)
    loss().backward()
    clean = _grads(model)
    pgd = PGD(model, epsilon=0.3, alpha=0.2, steps=3)
    norms = []
    for t in range(3):
        pgd.attack(first=t == 0)
        norms.append(float(torch.linalg.vector_norm(emb.detach() - before)))
        model.zero_grad()
        loss().backward()
    assert norms[0] == pytest.approx(0.2, rel=1e-4)  # one step of alpha
    assert norms[-1] == pytest.approx(0.3, rel=1e-4)  # 3 * 0.2 > 0.3: projected onto the ball
    pgd.restore()
    assert torch.equal(emb.detach(), before)
    # backward_adversarial keeps the clean gradient and adds the last step's
    model.zero_grad()
    loss().backward()
    adv = PGD(model, epsilon=0.3, alpha=0.2, steps=3).backward_adversarial(loss, lambda x: x.backward())
    assert torch.equal(emb.detach(), before) and float(adv) > 0
    head = model.head.weight.grad
    assert not torch.allclose(head, clean["head.weight"])  # the adversarial gradient was added
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_awp_perturbs_within_bounds_and_restores_exactly(tiny_bert, tiny_batch):
    batch, labels = tiny_batch
    model = _model(tiny_bert)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _loss(model, batch, labels)
    clean_loss = loss()
    clean_loss.backward()
    awp = AWP(model, adv_lr=1.0, adv_eps=0.01)
    awp.save()
    awp.attack_step()
    moved = 0
    for n, p in model.named_parameters():
        d = (p.detach() - before[n]).abs()
        assert torch.all(d <= 0.01 * before[n].abs() + 1e-7), n  # inside [w0 - eps|w0|, w0 + eps|w0|]
        moved += int(d.sum() > 0)
        if p.ndim < 2:
            assert d.sum() == 0, n  # biases and LayerNorm are not perturbed
    assert moved >= 5
    assert loss().item() > clean_loss.item()  # an ascent step
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    AWP(model).backward_adversarial(loss, lambda x: x.backward())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_awp_starts_after_the_epoch_and_loss_threshold():
    awp = AWP(nn.Linear(2, 2), start_epoch=1.0, start_loss=0.5)
    assert not awp.active(0.5, 0.1)  # too early
    assert not awp.active(1.2, 0.8)  # loss still above the threshold
    assert awp.active(1.3, 0.45)
    assert awp.active(1.4, 0.9)  # once started it stays on


# ---- head, pooling, parameter groups ----------------------------------------------------------------


def test_multi_sample_dropout_head_averages_the_dropout_samples(tiny_bert, tiny_batch):
    batch, _ = tiny_batch
    plain = _model(tiny_bert)
    msd = _model(tiny_bert, msd_rates=[0.1, 0.3, 0.5])
    msd.load_state_dict(plain.state_dict())
    plain.eval(), msd.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch), msd(**batch), atol=1e-6)  # dropout off: the same head
        msd.train()
        pooled = msd.features(**batch)
        torch.manual_seed(5)
        got = msd.classify(pooled)
        torch.manual_seed(5)
        want = sum(msd.head(F.dropout(pooled, r, training=True)) for r in (0.1, 0.3, 0.5)) / 3
    assert torch.allclose(got, want, atol=1e-6)


def test_weighted_layer_pooling_by_hand(tiny_bert, tiny_batch):
    layers = tuple(torch.full((1, 2, 3), float(v)) for v in (1.0, 2.0, 4.0))
    wlp = WeightedLayerPooling(2)
    assert torch.allclose(wlp(layers), torch.full((1, 2, 3), 3.0))  # equal weights: mean of 2 and 4
    with torch.no_grad():
        wlp.layer_weights.copy_(torch.tensor([1.0, 3.0]))
    assert torch.allclose(wlp(layers), torch.full((1, 2, 3), (2 + 12) / 4))
    batch, _ = tiny_batch
    m = _model(tiny_bert, layer_pooling_last=8)  # clamped to the 2 layers + embeddings
    assert m.layer_pool.k == 3
    out = m.backbone(**batch, output_hidden_states=True)
    want = m.pool(sum(out.hidden_states) / 3, batch["attention_mask"])
    assert torch.allclose(m.features(**batch), want, atol=1e-5)
    names = [
        n
        for g in param_groups(m, 1e-4, 1e-3, 0.01)
        for n, p in m.named_parameters()
        if any(p is q for q in g["params"]) and g["lr"] == 1e-3
    ]
    assert "layer_pool.layer_weights" in names and "head.weight" in names  # trained at head_lr


def test_layerwise_lr_decay_groups(tiny_bert):
    m = _model(tiny_bert)
    lr_of = {}
    for g in param_groups(m, 1e-4, 1e-3, 0.01, layer_decay=0.5):
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    got = {n: lr_of[id(p)] for n, p in m.named_parameters()}
    assert got["backbone.encoder.layer.1.attention.self.query.weight"] == (pytest.approx(1e-4), 0.01)  # top layer
    assert got["backbone.encoder.layer.0.attention.self.query.weight"] == (pytest.approx(1e-4 * 0.5), 0.01)
    assert got["backbone.encoder.layer.0.attention.self.query.bias"] == (pytest.approx(1e-4 * 0.5), 0.0)
    assert got["backbone.embeddings.word_embeddings.weight"] == (pytest.approx(1e-4 * 0.25), 0.01)
    assert got["head.weight"] == (1e-3, 0.0)
    assert layer_index("backbone.pooler.dense.weight", 2) == 3  # above the encoder: full lr
    groups = param_groups(m, 1e-4, 1e-3, 0.01, layer_decay=0.5)
    assert groups[0]["lr"] == 1e-4 and groups[-1]["lr"] == 1e-3  # the top backbone lr first (logged as train/lr)
    # no decay: every backbone parameter at lr, the groups cover each trainable parameter once
    groups = param_groups(m, 1e-4, 1e-3, 0.01)
    assert {g["lr"] for g in groups} == {1e-4, 1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    with pytest.raises(ConfigError, match="llrd_decay"):
        param_groups(m, 1e-4, 1e-3, 0.01, layer_decay=0.0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert, tiny_batch):
    batch, labels = tiny_batch
    plain, ckpt = _model(tiny_bert), _model(tiny_bert)
    ckpt.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.backbone.is_gradient_checkpointing
    for m in (plain, ckpt):
        _loss(m, batch, labels)().backward()
    a, b = _grads(plain), _grads(ckpt)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


# ---- config ----------------------------------------------------------------------------------------------


def test_tricks_default_off_and_old_configs_load(tmp_path):
    cfg = load_config("configs/demo.yaml")
    t = cfg.tricks
    assert (
        not any(
            [
                t.ema,
                t.fgm,
                t.pgd,
                t.awp,
                t.rdrop,
                t.msd,
                t.layer_pooling,
                t.mixup,
                t.self_distill,
                t.pseudo_label,
                t.llrd,
                t.grad_checkpointing,
            ]
        )
        and t.loss == "ce"
        and t.label_smoothing == 0
    )
    old = cfg.to_dict()
    old.pop("tricks")  # a stored config of a run made before this section existed
    assert config_from_dict(old).tricks == t
    cfg = config_from_dict({}, ["tricks.ema=true", "tricks.loss=poly1", "tricks.class_weights=[1,2,2,1]"])
    assert cfg.tricks.ema and cfg.tricks.loss == "poly1" and cfg.tricks.class_weights == [1.0, 2.0, 2.0, 1.0]
    with pytest.raises(ConfigError, match="tricks.loss"):
        config_from_dict({}, ["tricks.loss=ghm"])


# ---- composed in real k-fold runs (tiny BERT, real queries) ---------------------------------------------


def _cfg(tmp_path, data_dir, model_dir, features=None, **tricks):
    """A 2-fold, 10-query tiny-BERT run config with these tricks (and ``features`` section)."""
    return config_from_dict(
        {
            "name": "tricks",
            "output_dir": str(tmp_path / "runs"),
            "data": {"dir": str(data_dir), "max_queries": 10},
            "text": {"max_length": 32, "cache_dir": str(tmp_path / "cache")},
            "model": {"name": str(model_dir), "freeze_embeddings": True},
            "train": {"folds": 2, "epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1, "num_threads": 1},
            "blend": {"members": []},
            "tricks": tricks,
            "features": features or {},
        }
    )


def test_all_tricks_composed_in_one_run(tmp_path, small_dataset, tiny_bert):
    from safetensors.torch import load_file

    from core.data.text import encode_pairs_cached
    from core.runs.store import RunStore
    from core.training.fold_loop import predict_proba
    from core.training.train import run_training

    store = RunStore(tmp_path / "runs.db")
    cfg = _cfg(
        tmp_path,
        small_dataset,
        tiny_bert,
        ema=True,
        fgm=True,
        awp=True,
        rdrop=True,
        loss="poly1",
        label_smoothing=0.1,
        class_weights=[1, 2, 2, 1],
        msd=True,
        layer_pooling=True,
        mixup=True,
        llrd=True,
        grad_checkpointing=True,
    )
    res = run_training(cfg, store)
    assert store.get_run(res.run_id)["status"] == "finished"
    names = {m["name"] for m in store.metrics(res.run_id)}
    assert {
        "train/loss",
        "train/rdrop_kl",
        "train/adv_loss",
        "train/awp_loss",
        "eval/ndcg",
        "fold/ndcg",
        "cv/ndcg",
        "progress/step",
        "progress/total_steps",
    } <= names
    assert all(m["value"] >= 0 for m in store.metrics(res.run_id, ["train/rdrop_kl"]))
    np.testing.assert_allclose(res.oof[["p_E", "p_S", "p_C", "p_I"]].sum(axis=1), 1.0, atol=1e-5)
    # the saved checkpoint (EMA weights) reproduces the fold's OOF predictions
    from core.training.validate import load_training_frame

    df = load_training_frame(cfg)
    tok = load_tokenizer(str(tiny_bert))
    enc = encode_pairs_cached(df, tok, cfg.text)
    model = CrossEncoder.from_pretrained(
        str(tiny_bert), msd_rates=cfg.tricks.msd_rates, layer_pooling_last=cfg.tricks.layer_pooling_last
    )
    model.load_state_dict(load_file(str(res.run_dir / "fold0" / "model.safetensors")))
    rows = res.oof.index[res.oof["fold"] == 0]
    pos = df.reset_index(drop=True).index[df["example_id"].isin(res.oof.loc[rows, "example_id"])]
    probs = predict_proba(model, enc, pos.to_numpy(), 64, tok.pad_token_id, torch.device("cpu"))
    want = res.oof.set_index("example_id").loc[df.loc[pos, "example_id"], ["p_E", "p_S", "p_C", "p_I"]].to_numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)
    steps = store.metrics(res.run_id, ["progress/step"])
    total = store.metrics(res.run_id, ["progress/total_steps"])
    assert steps[-1]["value"] == total[-1]["value"]


def test_self_distillation_and_pseudo_labels_run_a_teacher_pass(tmp_path, small_dataset, tiny_bert):
    from core.runs.store import RunStore
    from core.training.train import run_training

    store = RunStore(tmp_path / "runs.db")
    cfg = _cfg(
        tmp_path,
        small_dataset,
        tiny_bert,
        self_distill=True,
        pseudo_label=True,
        pseudo_threshold=0.27,
        pgd=True,
        pgd_steps=2,
        loss="focal",
    )
    res = run_training(cfg, store)
    ms = store.metrics(res.run_id)
    names = {m["name"] for m in ms}
    assert {
        "teacher/fold_ndcg",
        "teacher/train_loss",
        "teacher/eval_ndcg",
        "fold/ndcg",
        "tricks/pseudo_rows",
        "train/adv_loss",
        "teacher/train_adv_loss",
    } <= names
    assert len([m for m in ms if m["name"] == "fold/done"]) == 2  # the student's folds only
    pseudo = [m["value"] for m in ms if m["name"] == "tricks/pseudo_rows"]
    n_test = len(res.test)
    assert len(pseudo) == 2 and all(0 <= v <= n_test for v in pseudo) and sum(pseudo) > 0
    steps = [m for m in ms if m["name"] == "progress/step"]
    total = [m for m in ms if m["name"] == "progress/total_steps"]
    assert steps[-1]["value"] == total[-1]["value"]  # ETA total corrected for the pseudo-labelled rows
    assert sorted(res.oof["fold"].unique()) == [0, 1]


def test_fgm_and_pgd_together_is_a_config_error(tmp_path, small_dataset, tiny_bert):
    from core.runs.store import RunStore
    from core.training.train import run_training

    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(ConfigError, match="fgm and tricks.pgd"):
        run_training(_cfg(tmp_path, small_dataset, tiny_bert, fgm=True, pgd=True), store)
    assert store.list_runs() == []  # refused by core.training.validate before a run row exists
