"""Model directories: what the metadata records, and refusal of tampered or mismatched artifacts."""

import json
import shutil

import pytest

from sanshi_ml.artifacts import ArtifactError, load_model, read_metadata, sha256_file
from sanshi_ml.text import model_input


def test_metadata_records_what_a_model_needs_to_be_trusted(demo_model_dir):
    meta = read_metadata(demo_model_dir)
    assert set(meta["targets"]) == {"category", "sanshi", "unit", "appeal"}
    sanshi = meta["targets"]["sanshi"]
    assert set(sanshi["labels"]) == {"公事", "共事", "家事"}
    assert 0 < sanshi["threshold"] <= 1.01 and sanshi["threshold_info"]["target_accuracy"] == 0.95
    assert meta["metrics"]["sanshi"]["accuracy"] > 0.5
    assert {"scikit-learn", "numpy", "rjieba", "opencc", "python"} <= set(meta["libraries"])
    assert len(meta["data"]["sha256"]) == 64
    assert meta["data"]["load_report"]["empty_text"] == 2  # the demo's two rows with neither title nor text
    assert "git_commit" in meta
    assert meta["artifact"]["sha256"] == sha256_file(demo_model_dir / "model.joblib")
    assert meta["policy"]["sha256"] and meta["split"]["seed"] == 42


def test_round_trip_loads_and_predicts(demo_model_dir):
    loaded = load_model(demo_model_dir)
    assert loaded.version == read_metadata(demo_model_dir)["artifact"]["sha256"][:12]
    predictions, _ = loaded.model.predict(["小区电梯坏了物业不修"])
    assert predictions["sanshi"].proba.shape == (1, 3)


@pytest.fixture
def model_copy(demo_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(demo_model_dir, target)
    return target


def test_tampered_model_file_is_refused_before_unpickling(model_copy):
    with open(model_copy / "model.joblib", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ArtifactError, match="integrity check failed"):
        load_model(model_copy)


def test_model_file_swapped_from_another_model_is_refused(model_copy, tmp_path):
    other = tmp_path / "other.joblib"
    import joblib

    joblib.dump({"not": "a model"}, other)
    shutil.copy(other, model_copy / "model.joblib")
    with pytest.raises(ArtifactError, match="does not belong to this metadata"):
        load_model(model_copy)


def test_right_hash_but_wrong_object_is_refused(model_copy):
    import joblib

    joblib.dump({"not": "a model"}, model_copy / "model.joblib")
    meta = json.loads((model_copy / "metadata.json").read_text())
    meta["artifact"]["sha256"] = sha256_file(model_copy / "model.joblib")
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not a sanshi-ml TriageModel"):
        load_model(model_copy)


def test_library_version_mismatch_is_refused_unless_allowed(model_copy):
    meta = json.loads((model_copy / "metadata.json").read_text())
    meta["libraries"]["scikit-learn"] = "0.0.1"
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="trained with scikit-learn 0.0.1"):
        load_model(model_copy)
    with pytest.warns(UserWarning, match="scikit-learn 0.0.1"):
        load_model(model_copy, allow_version_mismatch=True)


def test_missing_pieces_are_named(model_copy, tmp_path):
    with pytest.raises(ArtifactError, match="model directory not found"):
        load_model(tmp_path / "nothing")
    (model_copy / "model.joblib").unlink()
    with pytest.raises(ArtifactError, match="model file missing"):
        load_model(model_copy)
    (model_copy / "metadata.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="unreadable metadata"):
        load_model(model_copy)


def test_training_is_reproducible_bit_for_bit(repo_params, tmp_path):
    from sanshi_ml.config import with_overrides
    from sanshi_ml.train import train
    from tests.conftest import DEMO_CSV

    params = with_overrides(repo_params, {"data.columns.targets": {"sanshi": "三事"}})
    digests = []
    for _ in range(2):
        train([DEMO_CSV], params, model_dir=tmp_path / "model", progress=lambda _m: None, track=False)
        digests.append(sha256_file(tmp_path / "model" / "model.joblib"))
    assert digests[0] == digests[1]


def test_vocabularies_are_packed_for_fast_loading_and_restored_exactly(demo_model_dir):
    import pickle

    import numpy as np

    from sanshi_ml.model import TriageModel, _PackedStrings

    model = load_model(demo_model_dir).model
    state = model.__getstate__()
    for name in ("vectorizer", "title_vectorizer"):
        assert all(isinstance(v.vocabulary_, _PackedStrings) for _, v in state[name].transformer_list)
    assert isinstance(state["word_names"], _PackedStrings)
    assert all(isinstance(v.vocabulary_, dict) for _, v in model.vectorizer.transformer_list)  # live model as it was
    texts = ["小区电梯坏了一个多月物业不修", "楼上噪音扰民", "", model_input("电梯故障", "一个多月没人修")]
    expected, _ = model.predict(texts)
    clone = pickle.loads(pickle.dumps(model))
    old_layout = TriageModel.__new__(TriageModel)  # an artifact saved before packing: plain dicts and arrays
    old_layout.__setstate__({**model.__getstate__(), "vectorizer": model.vectorizer,
                             "title_vectorizer": model.title_vectorizer, "word_names": model.word_names})
    for other in (clone, old_layout):
        for name in ("vectorizer", "title_vectorizer"):
            pairs = zip(getattr(model, name).transformer_list, getattr(other, name).transformer_list)
            for (_, mine), (_, theirs) in pairs:
                assert list(theirs.vocabulary_.items()) == list(mine.vocabulary_.items())  # same keys, same order
        assert other.word_names.dtype == object and np.array_equal(other.word_names, model.word_names)
        got, _ = other.predict(texts)
        assert all(np.array_equal(got[t].proba, expected[t].proba) for t in expected)
    before_titles = TriageModel.__new__(TriageModel)  # an artifact saved before the title block
    before_titles.__setstate__({k: v for k, v in model.__getstate__().items() if k != "title_vectorizer"})
    assert before_titles.title_vectorizer is None


def test_strings_holding_the_separator_are_stored_unpacked():
    from sanshi_ml.model import _PackedStrings

    assert _PackedStrings.pack(["a\x00b", "c"]) == ["a\x00b", "c"]
    assert _PackedStrings.unpack(_PackedStrings.pack({})) == {}
    assert _PackedStrings.unpack(_PackedStrings.pack(["x"])) == ["x"]
