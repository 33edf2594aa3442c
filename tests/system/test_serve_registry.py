"""The server loads its model from the MLflow registry (``models:/sanshi-triage@champion``) on a real SQLite store."""

from __future__ import annotations

import mlflow
import pytest
from fastapi.testclient import TestClient

from sanshi_ml.artifacts import load_model
from sanshi_ml.config import with_overrides
from sanshi_ml.stages.train import train
from sanshi_ml.suggest import Suggester
from sanshi_ml.tracking import champion_uri, promote
from serve.app import create_app
from serve.settings import Settings
from tests.conftest import DEMO_CSV
from tests.system.serve_support import TEST_HOSTS, wait_ready, wait_settled

pytestmark = pytest.mark.slow  # one tracked training and a registry round trip: about 15 s

TEXT = "小区电梯坏了一个多月，物业一直不修"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, repo_params):
    root = tmp_path_factory.mktemp("serve_registry")
    params = with_overrides(
        repo_params,
        {"train.calibration_cv": 3, "tracking.enabled": True, "tracking.uri": f"sqlite:///{root / 'mlflow.db'}"},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        result = train([DEMO_CSV], params, model_dir=root / "model", progress=lambda _m: None)
        promote(result.run_id, params)
        yield {"root": root, "params": params, "result": result}
        mlflow.set_tracking_uri(previous)


def test_the_champion_is_served_from_the_registry(registry):
    params, result = registry["params"], registry["result"]
    uri = champion_uri(params)
    settings = Settings(
        model_uri=uri,
        tracking_uri=params.tracking.uri,
        database_url=f"sqlite:///{registry['root'] / 'feedback.db'}",
        allowed_hosts=TEST_HOSTS,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        ready = wait_ready(client)
        download = app.state.sanshi.download_dir
        assert download is not None and download.exists()
        info = client.get("/v1/model").json()
        answer = client.post("/v1/suggest", json={"text": TEXT}).json()
    assert not download.exists()  # the downloaded copy is removed at shutdown
    expected_version = result.metadata["artifact"]["sha256"][:12]
    assert ready["model_version"] == info["version"] == expected_version
    assert info["source"] == uri and info["name"] == params.tracking.registered_model
    local = Suggester.from_loaded(load_model(result.model_dir))
    assert answer == {"id": None, **local.suggest([(None, TEXT)], top_k=3)[0]}


def test_an_unknown_alias_is_reported_by_ready(registry):
    params = registry["params"]
    settings = Settings(
        model_uri=f"models:/{params.tracking.registered_model}@no-such-alias",
        tracking_uri=params.tracking.uri,
        database_url=f"sqlite:///{registry['root'] / 'feedback2.db'}",
        allowed_hosts=TEST_HOSTS,
    )
    with TestClient(create_app(settings)) as client:
        body = wait_settled(client)
        assert body["status"] == "failed" and "no-such-alias" in body["error"]
        assert client.post("/v1/suggest", json={"text": TEXT}).status_code == 503
