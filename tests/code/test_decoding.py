"""Joint decoding of linked targets: the chosen pair is always allowed and maximises the product of probabilities."""

import numpy as np
import pytest

from sanshi_ml.core.decoding import LinkedTargets

CATEGORIES = ["城乡建设", "环境保护"]
SUBCATEGORIES = ["物业管理", "噪音污染", "垃圾处理"]
PAIRS = [("城乡建设", "物业管理"), ("环境保护", "噪音污染"), ("环境保护", "垃圾处理")]


def test_decoding_picks_the_best_allowed_pair_not_the_two_argmaxes():
    linked = LinkedTargets.from_pairs("category", "subcategory", CATEGORIES, SUBCATEGORIES, PAIRS)
    category = np.array([[0.55, 0.45], [0.9, 0.1], [0.2, 0.8]])
    subcategory = np.array([[0.1, 0.5, 0.4], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    first, second = linked.decode(category, subcategory)
    # row 0: argmaxes 城乡建设 + 噪音污染 are not a pair; best allowed is 环境保护/噪音污染 (0.45*0.5 > 0.55*0.1)
    # row 1: 城乡建设/物业管理 scores 0.18 against 环境保护/噪音污染 0.07: the confident category wins
    # row 2: the argmaxes already agree
    assert first.tolist() == [1, 0, 1] and second.tolist() == [1, 0, 2]
    assert linked.consistent(first, second).all()
    # brute force over every allowed pair gives the same choice
    for row in range(3):
        scores = {(i, j): category[row, i] * subcategory[row, j] for i, j in zip(*np.nonzero(linked.allowed))}
        assert max(scores, key=scores.get) == (first[row], second[row])


def test_labels_never_seen_together_stay_free_so_every_record_gets_an_answer():
    linked = LinkedTargets.from_pairs(
        "sanshi",
        "unit",
        ["公事", "共事", "家事"],
        ["住建部门", "社区居委会", "新单位"],
        [("公事", "住建部门"), ("共事", "社区居委会"), ("未知", "住建部门")],
    )
    assert linked.allowed[2].all()  # 家事 was never paired: it may go with any unit
    assert linked.allowed[:, 2].all()  # neither was the new unit
    assert not linked.allowed[0, 1]


def test_shape_mismatch_is_a_clear_error():
    linked = LinkedTargets.from_pairs("a", "b", ["x", "y"], ["u"], [("x", "u")])
    with pytest.raises(ValueError, match="columns"):
        linked.decode(np.ones((1, 3)), np.ones((1, 1)))


def _demo_records(repo_params, targets):
    import pandas as pd

    from sanshi_ml.data.records import ColumnMap, to_records
    from tests.conftest import DEMO_CSV

    frame = pd.read_csv(DEMO_CSV, dtype=str)
    return to_records(frame, ColumnMap(text_cols=("标题", "诉求内容"), targets=targets), "demo")


@pytest.mark.parametrize("classifier", ["linear_svc", "logistic_regression", "sgd_modified_huber"])
def test_linked_heads_only_ever_suggest_pairs_seen_in_training(repo_params, classifier):
    from sanshi_ml.core.model import StackedHeads, TriageModel

    records = _demo_records(repo_params, {"sanshi": "三事", "unit": "承办单位"})
    train_cfg = repo_params.train.model_copy(update={"classifier": classifier})
    model = TriageModel(repo_params.text, repo_params.features, train_cfg).fit(records, progress=lambda _m: None)
    [link] = model.links
    assert (link.first, link.second) == ("sanshi", "unit")
    seen = set(zip(records.labels("sanshi"), records.labels("unit")))
    texts = records.frame["text"].tolist()[:200] + ["楼上邻居半夜装修噪音扰民", "小区路灯坏了", "我家老人走失了"]
    predictions, _ = model.predict(texts)
    pairs = set(zip(predictions["sanshi"].labels, predictions["unit"].labels))
    assert pairs <= seen
    assert isinstance(model._stacked, StackedHeads)  # every linear classifier takes the stacked fast path
    # the confidence is the chosen label's probability through the head's top-label map, and review follows it
    unit = predictions["unit"]
    assert np.array_equal(unit.chosen_proba, unit.proba[np.arange(len(texts)), unit.index])
    assert np.array_equal(unit.confidence, model.heads["unit"].confidence_map(unit.chosen_proba))
    assert np.array_equal(unit.needs_review, unit.confidence < unit.threshold)


def test_without_links_each_head_takes_its_own_argmax_and_old_models_load(repo_params):
    import pickle

    from sanshi_ml.core.model import TriageModel

    records = _demo_records(repo_params, {"sanshi": "三事", "unit": "承办单位"})
    train_cfg = repo_params.train.model_copy(update={"linked_targets": []})
    model = TriageModel(repo_params.text, repo_params.features, train_cfg).fit(records, progress=lambda _m: None)
    assert model.links == []
    predictions, _ = model.predict(["小区路灯坏了"])
    assert predictions["unit"].chosen is None
    assert predictions["unit"].index[0] == predictions["unit"].proba[0].argmax()
    state = model.__getstate__()
    del state["links"]  # a model pickled before joint decoding existed
    old = TriageModel.__new__(TriageModel)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.links == [] and old.predict(["小区路灯坏了"])[0]["unit"].labels[0] == predictions["unit"].labels[0]


def test_prior_correction_moves_decisions_toward_a_rare_label_only_when_the_hold_out_says_so():
    from sanshi_ml.core.model import TargetPredictions, choose_prior_correction, prior_weights

    classes = ["公事", "家事"]
    y_fit = np.array(["公事"] * 90 + ["家事"] * 10)
    assert np.allclose(prior_weights(classes, y_fit, 1.0), [1 / 0.9, 1 / 0.1])
    assert np.allclose(prior_weights(classes, y_fit, 0.0), [1.0, 1.0])
    # The rare label's rows get p(家事) of 0.3-0.45: a plain argmax never picks it, a corrected one does.
    rng = np.random.default_rng(0)
    rare = rng.uniform(0.30, 0.45, 20)
    common = rng.uniform(0.0, 0.05, 180)
    p_rare = np.concatenate([rare, common])
    proba = np.column_stack([1 - p_rare, p_rare])
    y_hold = np.array(["家事"] * 20 + ["公事"] * 180)
    tau, f1 = choose_prior_correction(proba, classes, y_fit, y_hold, [0.0, 0.5, 1.0])
    assert tau > 0 and f1 == 1.0
    assert choose_prior_correction(proba, classes, y_fit, y_hold, [0.0]) == (0.0, pytest.approx(0.4736842))
    # At prediction the weights choose the label; the confidence stays the calibrated probability of that label.
    pred = TargetPredictions(classes, proba[:3], threshold=0.5, weights=prior_weights(classes, y_fit, tau))
    assert pred.labels.tolist() == ["家事", "家事", "家事"]
    assert np.array_equal(pred.confidence, proba[:3, 1]) and pred.needs_review.all()


def test_the_chosen_strength_is_recorded_and_zero_means_no_weights(repo_params):
    from sanshi_ml.core.model import TriageModel

    records = _demo_records(repo_params, {"sanshi": "三事", "category": "一级分类"})
    off = repo_params.train.model_copy(update={"prior_correction_by_target": {}})
    model = TriageModel(repo_params.text, repo_params.features, off).fit(records, progress=lambda _m: None)
    for head in model.heads.values():
        assert head.decision_weights is None and head.threshold_info["prior_correction_tau"] == 0.0
    # By default only 三事 searches strengths; the other heads keep the plain argmax.
    on = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(records, progress=lambda _m: None)
    info = on.heads["sanshi"].threshold_info
    assert info["prior_correction_tau"] in repo_params.train.prior_correction_by_target["sanshi"]
    assert 0 <= info["holdout_macro_f1"] <= 1
    assert (on.heads["sanshi"].decision_weights is None) == (info["prior_correction_tau"] == 0)
    assert on.heads["category"].threshold_info["prior_correction_tau"] == 0.0


def test_review_thresholds_and_confidence_maps_come_from_every_training_row_out_of_fold(repo_params):
    from sanshi_ml.core.model import TriageModel

    records = _demo_records(repo_params, {"sanshi": "三事", "unit": "承办单位"})
    model = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(
        records, progress=lambda _m: None
    )
    for name, head in model.heads.items():
        labelled = int(records.has_label(name).sum()) - sum(head.excluded_labels.values())
        assert head.threshold_info["n_holdout"] == labelled == head.confidence_map.n_calibration
        counts = records.frame.loc[records.has_label(name), name].value_counts()
        rarest = counts[counts >= repo_params.train.min_label_rows].min()  # fewer folds than 5 for a rare unit
        assert head.threshold_info["cross_fit_folds"] == min(repo_params.train.calibration_cv, rarest)
        assert head.conformal.n_calibration == labelled
    # without the map the confidence is the chosen label's probability, and the thresholds are chosen on it
    plain_cfg = repo_params.train.model_copy(update={"confidence_calibration": "none"})
    plain = TriageModel(repo_params.text, repo_params.features, plain_cfg).fit(records, progress=lambda _m: None)
    predictions, _ = plain.predict(["小区路灯坏了", "楼上邻居半夜装修噪音扰民"])
    assert all(head.confidence_map is None for head in plain.heads.values())
    assert np.array_equal(predictions["unit"].confidence, predictions["unit"].chosen_proba)
    # the map never changes a label, only the confidence
    mapped, _ = model.predict(["小区路灯坏了", "楼上邻居半夜装修噪音扰民"])
    assert mapped["unit"].labels.tolist() == predictions["unit"].labels.tolist()
