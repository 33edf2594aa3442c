"""Model directories: what the metadata records, and refusal of tampered or mismatched artifacts."""

import json
import shutil

import pytest

from sanshi_ml.artifacts import ArtifactError, load_model, read_metadata, sha256_file
from sanshi_ml.data.records import model_input


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
    from sanshi_ml.stages.train import train
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

    from sanshi_ml.core.model import TriageModel, _PackedStrings

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
    old_layout.__setstate__(
        {
            **model.__getstate__(),
            "vectorizer": model.vectorizer,
            "title_vectorizer": model.title_vectorizer,
            "word_names": model.word_names,
        }
    )
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
    from sanshi_ml.core.model import _PackedStrings

    assert _PackedStrings.pack(["a\x00b", "c"]) == ["a\x00b", "c"]
    assert _PackedStrings.unpack(_PackedStrings.pack({})) == {}
    assert _PackedStrings.unpack(_PackedStrings.pack(["x"])) == ["x"]


# ------------------------------------------------------------------------------------------------------------------
# Issue 15: an artifact cannot run code it was not meant to, whoever wrote the directory.

import hashlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import joblib  # noqa: E402
import numpy as np  # noqa: E402

from sanshi_ml import artifacts  # noqa: E402

KEY = "k" * 32


class _RunsCode:
    """Unpickled, this runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(model_dir, obj) -> None:
    """Replace the model file by ``obj`` pickled, and recompute the sha256 in the metadata, as an attacker who can
    write the directory would."""
    joblib.dump(obj, model_dir / "model.joblib", compress=("lz4", 3))
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["artifact"]["sha256"] = sha256_file(model_dir / "model.joblib")
    meta["artifact"]["bytes"] = (model_dir / "model.joblib").stat().st_size
    (model_dir / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture
def no_key(monkeypatch):
    for name in ("SANSHI_MODEL_KEY", "SANSHI_MODEL_KEY_FILE", "SANSHI_REQUIRE_SIGNED"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("payload", ["top level", "nested object array", "inside a dict"])
def test_a_pickle_that_runs_code_is_refused_even_with_a_recomputed_sha256(model_copy, tmp_path, no_key, payload):
    marker = tmp_path / "ran"
    evil = _RunsCode(marker)
    obj = {
        "top level": evil,
        "nested object array": {"labels": np.array(["公事", evil], dtype=object)},
        "inside a dict": {"model": [1, 2, {"x": evil}]},
    }[payload]
    _plant(model_copy, obj)
    with pytest.raises(ArtifactError, match="posix.system, which a sanshi-ml model never holds"):
        load_model(model_copy)
    assert not marker.exists()


def test_the_bytes_hashed_are_the_bytes_unpickled(model_copy, tmp_path, monkeypatch, no_key):
    # The file is swapped for a planted pickle right after its sha256 is computed (the race that got through once
    # in 40 tries): what is unpickled must be what was hashed.
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.joblib"
    joblib.dump(_RunsCode(marker), evil)
    real_sha256 = hashlib.sha256

    class Swapping:
        def __init__(self, *args):
            self.digest = real_sha256(*args)

        def update(self, data):
            self.digest.update(data)

        def hexdigest(self):
            shutil.copy(evil, model_copy / "model.joblib")
            return self.digest.hexdigest()

    monkeypatch.setattr(artifacts, "hashlib", SimpleNamespace(sha256=Swapping))
    loaded = load_model(model_copy)
    assert type(loaded.model).__name__ == "TriageModel" and not marker.exists()


@pytest.mark.parametrize(
    "name",
    ["../elsewhere/model.joblib", "/tmp/model.joblib", "sub/model.joblib", "..", "..\\elsewhere\\model.joblib", ""],
)
def test_the_metadata_cannot_point_the_model_file_outside_its_directory(model_copy, tmp_path, name, no_key):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model_copy / "model.joblib", elsewhere / "model.joblib")  # a perfectly good model, elsewhere
    meta = json.loads((model_copy / "metadata.json").read_text())
    meta["artifact"]["file"] = name
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="only a file name inside the model directory"):
        load_model(model_copy)


def test_recorded_outcome_files_stay_inside_the_model_directory(model_copy, tmp_path, no_key):
    # evaluate reads the estimate's and the holdout's outcome files through checked_file (the demo model has no
    # holdout).
    from sanshi_ml.artifacts import checked_file

    record = read_metadata(model_copy)["estimate"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model_copy / record["file"], elsewhere / record["file"])
    assert checked_file(model_copy, record) == model_copy / record["file"]
    for name in (f"../elsewhere/{record['file']}", str(elsewhere / record["file"])):
        with pytest.raises(ArtifactError, match="only a file name inside the model directory"):
            checked_file(model_copy, {**record, "file": name})


def _with_policy_file(model_copy, tmp_path):
    from sanshi_ml.core.policy import DEFAULT_POLICY_FILE

    policy = tmp_path / "policy.yaml"
    shutil.copy(DEFAULT_POLICY_FILE, policy)
    meta = json.loads((model_copy / "metadata.json").read_text())
    meta["policy"]["path"] = str(policy)
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    return policy


def test_a_policy_file_changed_since_training_is_refused(model_copy, tmp_path, no_key):
    from sanshi_ml.suggest import Suggester

    policy = _with_policy_file(model_copy, tmp_path)
    assert Suggester.from_loaded(load_model(model_copy)).policy.sha256 == read_metadata(model_copy)["policy"]["sha256"]
    policy.write_text(policy.read_text(encoding="utf-8").replace("社区居委会", "物业公司", 1), encoding="utf-8")
    with pytest.raises(ArtifactError, match="责任清单 changed since the model .* was trained"):
        Suggester.from_loaded(load_model(model_copy))


def test_a_policy_given_explicitly_is_used_and_the_difference_said(model_copy, tmp_path, caplog, no_key):
    from sanshi_ml.suggest import Suggester

    policy = _with_policy_file(model_copy, tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(policy.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sanshi_ml.artifacts"):
        suggester = Suggester.from_loaded(load_model(model_copy), str(other))
    assert suggester.policy.sha256 == hashlib.sha256(other.read_bytes()).hexdigest()
    assert "not the one the model" in caplog.text and str(other) in caplog.text


def test_dask_workers_unpickle_through_the_same_checks(demo_model_dir, tmp_path, no_key):
    from sanshi_ml.core.policy import load_policy
    from sanshi_ml.scoring import ModelBundle, ScoringError, _bundle_suggester

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.joblib"
    joblib.dump(_RunsCode(marker), evil)
    data = evil.read_bytes()
    bundle = ModelBundle(data, hashlib.sha256(data).hexdigest(), read_metadata(demo_model_dir), load_policy())
    with pytest.raises(ScoringError, match="never holds"):
        _bundle_suggester(bundle)
    assert not marker.exists()
    good = (demo_model_dir / "model.joblib").read_bytes()
    with pytest.raises(ScoringError, match="integrity check failed"):
        _bundle_suggester(ModelBundle(good, bundle.sha256, bundle.metadata, bundle.policy))
    suggester = _bundle_suggester(ModelBundle(good, hashlib.sha256(good).hexdigest(), bundle.metadata, bundle.policy))
    assert suggester.targets == ["category", "sanshi", "unit", "appeal"]


def test_the_mlflow_pyfunc_wrapper_loads_through_the_same_checks(model_copy, tmp_path, no_key):
    from sanshi_ml.pyfunc import SANSHI_ARTIFACT, SanshiTriageModel

    marker = tmp_path / "ran"
    _plant(model_copy, _RunsCode(marker))
    with pytest.raises(ArtifactError, match="never holds"):
        SanshiTriageModel().load_context(SimpleNamespace(artifacts={SANSHI_ARTIFACT: str(model_copy)}))
    assert not marker.exists()


def test_the_server_loads_through_the_same_checks(model_copy, tmp_path, no_key):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from tests.system.serve_support import make_settings, wait_settled

    marker = tmp_path / "ran"
    _plant(model_copy, _RunsCode(marker))
    with TestClient(create_app(make_settings(model_copy, f"sqlite:///{tmp_path / 'feedback.db'}"))) as client:
        body = wait_settled(client)
    assert body["status"] == "failed" and not marker.exists()


def test_every_estimator_a_setting_can_put_in_a_model_passes_the_allow_list():
    # Models trained with each classifier, calibration method and confidence map (and pre-segmented text) name
    # exactly these; fitted here on a toy problem, they must unpickle through the allow-list.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.svm import LinearSVC

    from sanshi_ml.core.text import Segmenter

    X = np.random.default_rng(0).normal(size=(60, 4))
    y = np.array(["公事", "共事", "家事"] * 20, dtype=object)
    parts = [
        LogisticRegression().fit(X, y),
        SGDClassifier(loss="modified_huber").fit(X, y),
        IsotonicRegression().fit(X[:, 0], X[:, 1]),
        Segmenter(keep_only=["电梯", "物业"]),
    ]
    for method in ("sigmoid", "isotonic", "temperature"):
        parts.append(CalibratedClassifierCV(LinearSVC(), method=method, cv=2).fit(X, y))
    import io

    buffer = io.BytesIO()
    joblib.dump(parts, buffer, compress=("lz4", 3))
    restored = artifacts._unpickle(buffer.getvalue(), "toy")
    assert [type(p).__name__ for p in restored] == [type(p).__name__ for p in parts]


def test_a_directory_written_by_sanshi_ml_before_signatures_still_loads(demo_model_dir, tmp_path, monkeypatch, no_key):
    # The layout every earlier release wrote: model.joblib (joblib, lz4) and metadata.json, format 1, no signature.
    old = tmp_path / "old"
    old.mkdir()
    model = load_model(demo_model_dir).model
    joblib.dump(model, old / "model.joblib", compress=("lz4", 3))
    meta = {k: v for k, v in read_metadata(demo_model_dir).items() if k != "signature"}
    meta["format_version"] = 1
    meta["artifact"] = {
        "file": "model.joblib",
        "sha256": sha256_file(old / "model.joblib"),
        "bytes": (old / "model.joblib").stat().st_size,
    }
    (old / "metadata.json").write_text(json.dumps(meta, ensure_ascii=False))
    for record in (meta.get("estimate"), meta.get("holdout")):
        if record:
            shutil.copy(demo_model_dir / record["file"], old / record["file"])
    loaded = load_model(old)
    texts = ["小区电梯坏了物业不修"]
    assert np.array_equal(loaded.model.predict(texts)[0]["sanshi"].proba, model.predict(texts)[0]["sanshi"].proba)
    monkeypatch.setenv(artifacts.KEY_ENV, KEY)  # once a key is configured, it must be signed first
    with pytest.raises(ArtifactError, match="not signed.*python -m sanshi_ml.artifacts sign"):
        load_model(old)
    assert artifacts.main(["sign", str(old)]) == 0
    assert load_model(old).version == loaded.version


def test_with_a_key_a_model_signed_with_it_loads_and_a_consistent_forgery_does_not(model_copy, monkeypatch, no_key):
    monkeypatch.setenv(artifacts.KEY_ENV, KEY)
    artifacts.sign_model(model_copy)
    model = load_model(model_copy).model
    # A working model with other weights, its sha256 recomputed: integrity holds, authenticity does not.
    model.heads["sanshi"].threshold = 0.0
    _plant(model_copy, model)
    with pytest.raises(ArtifactError, match="changed after the model was signed"):
        load_model(model_copy)
    monkeypatch.setenv(artifacts.KEY_ENV, "another key, also long enough")
    with pytest.raises(ArtifactError, match="signed with another key"):
        load_model(model_copy)


def test_training_with_a_key_signs_and_unsigned_models_are_refused_when_required(
    model_copy, tmp_path, monkeypatch, no_key
):
    model = load_model(model_copy).model
    key_file = tmp_path / "model.key"
    key_file.write_text(KEY)
    monkeypatch.setenv(artifacts.KEY_FILE_ENV, str(key_file))
    metadata = artifacts.save_model(model, tmp_path / "signed", {"policy": read_metadata(model_copy)["policy"]})
    assert metadata["signature"]["algorithm"] == "hmac-sha256"
    assert load_model(tmp_path / "signed").version == metadata["artifact"]["sha256"][:12]
    artifacts.update_metadata(tmp_path / "signed", mlflow_run_id="abc")  # later fields keep the signature valid
    load_model(tmp_path / "signed")
    monkeypatch.setenv(artifacts.KEY_FILE_ENV, str(tmp_path / "signed" / "model.key"))
    (tmp_path / "signed" / "model.key").write_text(KEY)
    with pytest.raises(ArtifactError, match="lies in the model directory"):
        load_model(tmp_path / "signed")
    monkeypatch.delenv(artifacts.KEY_FILE_ENV)
    monkeypatch.setenv(artifacts.KEY_ENV, "short")
    with pytest.raises(ArtifactError, match="at least 16"):
        load_model(tmp_path / "signed")
    monkeypatch.delenv(artifacts.KEY_ENV)
    load_model(model_copy)  # no key: loads, with a warning
    monkeypatch.setenv(artifacts.REQUIRE_SIGNED_ENV, "1")
    with pytest.raises(ArtifactError, match="no model key is configured"):
        load_model(model_copy)
