"""The intake server through its HTTP API (`with TestClient(app)`), on a model trained on the demo data."""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sanshi_ml.artifacts import load_model
from sanshi_ml.data.records import model_input
from sanshi_ml.suggest import Suggester
from serve.app import create_app
from serve.store import FeedbackEntry, FeedbackStore
from tests.conftest import DEMO_CSV
from tests.system.serve_support import API_KEY, make_settings, read_only_file, wait_ready, wait_settled

KEY = {"X-API-Key": API_KEY}
TITLE = "小区电梯坏了一个多月没人修"
TEXT = "A3区青青家园小区5栋的电梯坏了一个多月，物业一直说在等配件，老人上下楼非常困难。"
PHONE, ID_NUMBER, EMAIL = "13812345678", "430102199001011234", "zhang.san@example.com"


@pytest.fixture(scope="module")
def served(demo_model_dir, tmp_path_factory):
    """One running app for the module (strict mode, suggestions open, feedback keyed)."""
    db = tmp_path_factory.mktemp("serve_api") / "feedback.db"
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{db}"))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def suggester(demo_model_dir) -> Suggester:
    return Suggester.from_loaded(load_model(demo_model_dir))


def assert_error(response, status: int, field: str, kind: str | None = None, secret: str | None = None) -> dict:
    """A JSON error body naming ``field``; never a traceback, never the submitted text."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message", "detail", "total"}
    assert len(body["detail"]) <= 10 and body["total"] >= len(body["detail"])
    fields = [item["field"] for item in body["detail"]]
    assert field in fields, body
    if kind is not None:
        assert kind in [item["type"] for item in body["detail"]], body
    assert field in body["message"]
    assert "Traceback" not in response.text
    if secret is not None:
        assert secret not in response.text
    return body


# ------------------------------------------------------------------------------------------------ probes and info


def test_health_answers_and_ready_names_the_model_version(served, demo_model_dir):
    assert served.get("/health").json() == {"status": "ok"}
    version = json.loads((demo_model_dir / "metadata.json").read_text(encoding="utf-8"))["artifact"]["sha256"][:12]
    assert served.get("/ready").json() == {"status": "ready", "model_version": version, "store": {"status": "ok"}}


def test_ready_is_503_until_the_model_is_loaded(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}"))
    state = app.state.sanshi
    release = threading.Event()
    real_load = state.load_model

    def held_load() -> None:  # the real loader, started only when the test says so
        assert release.wait(30)
        real_load()

    state.load_model = held_load
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        not_yet = client.get("/ready")
        assert not_yet.status_code == 503 and not_yet.json()["status"] == "loading"
        assert_error(client.post("/v1/suggest", json={"text": TEXT}), 503, "model", "not_ready")
        assert_error(client.get("/v1/model"), 503, "model")
        release.set()
        assert wait_ready(client)["status"] == "ready"
        assert client.post("/v1/suggest", json={"text": TEXT}).status_code == 200


def test_a_model_that_cannot_load_is_reported_by_ready(tmp_path):
    app = create_app(make_settings(tmp_path / "no-such-model", f"sqlite:///{tmp_path / 'f.db'}"))
    with TestClient(app) as client:
        body = wait_settled(client)
        assert body["status"] == "failed" and "no-such-model" in body["error"]
        assert client.get("/ready").status_code == 503
        assert_error(client.post("/v1/suggest", json={"text": TEXT}), 503, "model")


def test_model_info_describes_targets_labels_thresholds_and_provenance(served, demo_model_dir):
    meta = json.loads((demo_model_dir / "metadata.json").read_text(encoding="utf-8"))
    info = served.get("/v1/model").json()
    assert info["version"] == meta["artifact"]["sha256"][:12]
    assert info["name"] == demo_model_dir.name
    assert info["created_at"] == meta["created_at"]
    assert info["data_sha256"] == meta["data"]["sha256"]
    assert info["metrics_source"] == "out_of_fold" and info["n_train"] == 418  # every row, measured out of fold
    assert set(info["targets"]) == set(meta["targets"])
    for target, described in meta["targets"].items():
        assert info["targets"][target]["labels"] == described["labels"]
        assert info["targets"][target]["threshold"] == pytest.approx(described["threshold"])
        assert info["targets"][target]["column"] == meta["columns"]["targets"][target]
        assert info["targets"][target]["metrics"]["macro_f1"] == pytest.approx(meta["metrics"][target]["macro_f1"])
    assert info["sanshi_target"] == "sanshi"
    assert {c["colour"] for c in info["sanshi_classes"].values()} == {"red", "orange", "yellow"}
    assert info["limits"] == {"max_text_chars": 20_000, "max_batch": 256, "top_k": 3}


# ---------------------------------------------------------------------------------------------------- suggestions


def test_suggest_gives_every_target_with_confidence_review_flag_and_reasons(served, suggester):
    response = served.post("/v1/suggest", json={"id": "D1", "title": TITLE, "text": TEXT})
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "D1"
    assert set(body["fields"]) == {"category", "sanshi", "unit", "appeal"}
    for name, field in body["fields"].items():
        assert field["label"] == field["top_k"][0]["label"]
        # the confidence is the suggested label's probability through the target's top-label calibration
        confidence_map = suggester.model.heads[name].confidence_map
        assert field["confidence"] == pytest.approx(float(confidence_map(field["top_k"][0]["probability"])))
        assert len(field["top_k"]) == 3
        assert field["needs_review"] == bool(field["review_reasons"])
        assert ("low_confidence" in field["review_reasons"]) == (field["confidence"] < field["threshold"])
    sanshi = body["fields"]["sanshi"]
    assert sanshi["label"] == "共事"  # an estate's broken lift is a shared affair of the compound
    assert sanshi["sanshi"]["colour"] == "orange" and sanshi["sanshi"]["time_limit_days"] > 0
    assert "电梯" in sanshi["reasons"]
    assert body["needs_review"] == any(f["needs_review"] for f in body["fields"].values())


def test_suggest_is_the_same_answer_as_the_suggester_and_batch_scoring(served, suggester):
    expected = suggester.suggest([(TITLE, TEXT)], top_k=3)[0]
    body = served.post("/v1/suggest", json={"title": TITLE, "text": TEXT}).json()
    assert body == {"id": None, **expected}
    frame = suggester.score_frame([model_input(TITLE, TEXT)])
    for target, field in body["fields"].items():
        assert frame[target][0] == field["label"]
        assert float(frame[f"{target}_confidence"][0]) == pytest.approx(field["confidence"], rel=1e-6)


def test_top_k_can_be_asked_for(served):
    body = served.post("/v1/suggest?top_k=1", json={"text": TEXT}).json()
    assert all(len(f["top_k"]) == 1 for f in body["fields"].values())
    assert_error(served.post("/v1/suggest?top_k=0", json={"text": TEXT}), 422, "top_k")
    assert_error(served.post("/v1/suggest?top_k=abc", json={"text": TEXT}), 422, "top_k")


def test_batch_answers_in_order_and_matches_single_requests(served):
    texts = [
        "楼上邻居每天深夜拖动家具，噪音太大，沟通无果",
        TEXT,
        "建议周末延长地铁末班车时间到十一点半",
        "公司拖欠三个月工资不发，老板联系不上",
    ]
    records = [{"id": f"R{i}", "text": t} for i, t in enumerate(texts)]
    body = served.post("/v1/suggest/batch", json={"records": records}).json()
    assert [s["id"] for s in body["suggestions"]] == ["R0", "R1", "R2", "R3"]
    for record, suggestion in zip(records, body["suggestions"]):
        assert served.post("/v1/suggest", json=record).json() == suggestion
    assert body["model_version"] == body["suggestions"][0]["model_version"]


def test_concurrent_requests_get_the_answers_they_would_get_alone(served):
    texts = [
        f"第{i}号楼{word}"
        for i, word in enumerate(
            ["电梯坏了物业不修", "楼上噪音扰民", "路灯不亮", "拖欠工资", "垃圾没人清运", "小区停车位被占"] * 3
        )
    ]
    alone = {t: served.post("/v1/suggest", json={"text": t}).json() for t in texts}
    answers: dict[str, dict] = {}

    def ask(text: str) -> None:
        answers[text] = served.post("/v1/suggest", json={"text": text}).json()

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == alone


# --------------------------------------------------------------------------------------------------- bad input


LONG = "长" * 20_001

BAD_SUGGEST = [
    pytest.param(b'{"text": ""}', 422, "text", "string_too_short", id="empty-text"),
    pytest.param('{"text": " \\n\\t\u3000 "}'.encode(), 422, "text", "empty_text", id="whitespace-text"),
    pytest.param(json.dumps({"text": LONG}).encode(), 422, "text", "string_too_long", id="too-long"),
    pytest.param(b'{"text": "abc",', 400, "body", "invalid_json", id="invalid-json"),
    pytest.param(b'{"text": 12}', 422, "text", "string_type", id="text-not-a-string"),
    pytest.param(b'{"text": "abc", "title": ["x"]}', 422, "title", "string_type", id="title-wrong-type"),
    pytest.param(b'{"text": "abc", "colour": "red"}', 422, "colour", "unknown_field", id="unknown-field-strict"),
    pytest.param(b'{"title": "abc"}', 422, "text", "missing", id="missing-text"),
    pytest.param(b'{"text": "\xe7\x94\xb5\xff\xfe"}', 400, "body", "invalid_utf8", id="invalid-utf8"),
    pytest.param('{"text": "电梯\ufffd坏了"}'.encode(), 422, "text", "undecodable", id="replacement-char"),
    pytest.param(b'{"text": "\\ud800 lone surrogate"}', 422, "text", None, id="lone-surrogate"),
    pytest.param(b"", 422, "body", "missing", id="no-body"),
    pytest.param(b'["a list"]', 422, "body", None, id="not-an-object"),
    pytest.param(b"null", 422, "body", None, id="json-null"),
]


@pytest.mark.parametrize(("body", "status", "field", "kind"), BAD_SUGGEST)
def test_bad_single_requests_get_a_4xx_naming_the_field(served, body, status, field, kind):
    response = served.post("/v1/suggest", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, status, field, kind)


BAD_BATCH = [
    pytest.param({"records": [{"text": "a"}] * 257}, "records", "too_long", id="batch-over-256"),
    pytest.param({"records": []}, "records", "too_short", id="empty-batch"),
    pytest.param({"records": [{"text": "ok"}, {"text": "   "}]}, "records.1.text", "empty_text", id="one-blank"),
    pytest.param({"records": [{"text": "ok"}, {"text": LONG}]}, "records.1.text", "string_too_long", id="one-long"),
    pytest.param({"records": "x"}, "records", "list_type", id="records-not-a-list"),
    pytest.param({"records": [{"text": "a", "extra": 1}]}, "records.0.extra", "unknown_field", id="unknown-nested"),
]


@pytest.mark.parametrize(("payload", "field", "kind"), BAD_BATCH)
def test_bad_batches_get_a_422_naming_the_field(served, payload, field, kind):
    assert_error(served.post("/v1/suggest/batch", json=payload), 422, field, kind)


def test_text_at_the_limit_is_accepted(served):
    assert served.post("/v1/suggest", json={"text": "电梯坏了" * 5_000}).status_code == 200


def test_a_body_over_the_byte_limit_gets_413(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}", max_body_bytes=2_000))
    with TestClient(app) as client:
        wait_ready(client)
        assert_error(client.post("/v1/suggest", json={"text": "电梯坏了" * 400}), 413, "body", "body_too_large")


def test_lenient_mode_ignores_unknown_fields(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}", strict=False))
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post("/v1/suggest", json={"text": TEXT, "colour": "red"}).status_code == 200
        assert_error(client.post("/v1/suggest", json={"text": "  "}), 422, "text", "empty_text")


def test_unknown_paths_and_methods_get_json_errors(served):
    assert_error(served.get("/v2/nothing"), 404, "path", "not_found")
    assert_error(served.delete("/v1/suggest"), 405, "method", "method_not_allowed")


def test_validation_errors_do_not_echo_the_text(served):
    secret = f"我的电话{PHONE}"
    assert_error(served.post("/v1/suggest", json={"text": secret, "tel": secret}), 422, "tel", secret=PHONE)


# ----------------------------------------------------------------------------------------------------------- auth


def feedback_body(**overrides) -> dict:
    body = {
        "id": "D9",
        "title": TITLE,
        "text": TEXT,
        "model_version": "abc123",
        "suggestion": {"sanshi": {"label": "共事", "confidence": 0.9}, "unit": {"label": "住房和城乡建设局"}},
        "labels": {"sanshi": "共事", "unit": "社区居委会/村委会", "category": "城乡建设", "appeal": "投诉"},
    }
    return {**body, **overrides}


def test_feedback_and_export_need_the_key(served):
    assert_error(served.post("/v1/feedback", json=feedback_body()), 401, "X-API-Key", "unauthorized")
    wrong = served.post("/v1/feedback", json=feedback_body(), headers={"X-API-Key": "nope"})
    assert_error(wrong, 401, "X-API-Key")
    assert "wrong API key" in wrong.json()["message"]
    assert_error(served.get("/v1/feedback/export"), 401, "X-API-Key")
    assert_error(served.get("/v1/feedback/export", headers={"X-API-Key": API_KEY + "x"}), 401, "X-API-Key")
    assert served.post("/v1/feedback", json=feedback_body(), headers=KEY).status_code == 201
    assert served.get("/v1/feedback/export", headers=KEY).status_code == 200


def test_without_a_configured_key_keyed_endpoints_are_closed(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}", api_key=None))
    with TestClient(app) as client:
        wait_ready(client)
        body = assert_error(client.post("/v1/feedback", json=feedback_body(), headers=KEY), 401, "X-API-Key")
        assert "SANSHI_API_KEY" in body["message"]
        assert client.post("/v1/suggest", json={"text": TEXT}).status_code == 200


def test_closed_suggestions_need_the_key_too(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}", open_suggestions=False))
    with TestClient(app) as client:
        wait_ready(client)
        assert_error(client.post("/v1/suggest", json={"text": TEXT}), 401, "X-API-Key")
        assert_error(client.post("/v1/suggest/batch", json={"records": [{"text": TEXT}]}), 401, "X-API-Key")
        assert client.post("/v1/suggest", json={"text": TEXT}, headers=KEY).status_code == 200
        assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------------------- feedback


def test_feedback_reports_accepted_and_corrected_fields(served):
    response = served.post("/v1/feedback", json=feedback_body(), headers=KEY)
    assert response.status_code == 201
    body = response.json()
    assert body["corrected"] == ["appeal", "category", "unit"]  # no suggestion for two, another unit chosen
    assert body["accepted"] == ["sanshi"]
    assert body["model_version"] == "abc123" and body["feedback_id"] >= 1


BAD_FEEDBACK = [
    pytest.param({"labels": {"colour": "red"}}, "labels.colour", "unknown_target", id="unknown-target"),
    pytest.param(
        {"suggestion": {"colour": {"label": "red"}}},
        "suggestion.colour",
        "unknown_target",
        id="unknown-suggested-target",
    ),
    pytest.param({"labels": {"sanshi": "  "}}, "labels.sanshi", None, id="blank-label"),
    pytest.param({"labels": {}}, "labels", None, id="no-labels"),
    pytest.param({"labels": {"sanshi": 3}}, "labels.sanshi", "string_type", id="label-not-a-string"),
    pytest.param({"text": "\t "}, "text", "empty_text", id="blank-text"),
    pytest.param({"model_version": ""}, "model_version", "string_too_short", id="no-model-version"),
    pytest.param({"received_at": "yesterday"}, "received_at", None, id="bad-time"),
    pytest.param({"received_at": "2024-03-05 08:30:00"}, "received_at", None, id="time-without-offset"),
    pytest.param({"received_at": 1709600000}, "received_at", None, id="time-as-number"),
    pytest.param(
        {"suggestion": {"sanshi": {"label": "共事", "confidence": True}}},
        "suggestion.sanshi.confidence",
        "float_type",
        id="confidence-not-a-number",
    ),
    pytest.param(
        {"suggestion": {"sanshi": {"label": "共事", "confidence": 1.5}}},
        "suggestion.sanshi.confidence",
        "less_than_equal",
        id="confidence-over-1",
    ),
    pytest.param({"clerk": "x" * 65}, "clerk", "string_too_long", id="clerk-too-long"),
]


@pytest.mark.parametrize(("change", "field", "kind"), BAD_FEEDBACK)
def test_bad_feedback_gets_a_422_naming_the_field(served, change, field, kind):
    assert_error(served.post("/v1/feedback", json=feedback_body(**change), headers=KEY), 422, field, kind)


def test_export_filters_are_validated(served):
    assert_error(served.get("/v1/feedback/export?since=not-a-time", headers=KEY), 422, "since")
    assert_error(served.get("/v1/feedback/export?until=0.62", headers=KEY), 422, "until")
    assert_error(served.get("/v1/feedback/export?colour=red", headers=KEY), 422, "colour", "unknown_field")
    later = served.get("/v1/feedback/export?since=2999-01-01T00:00:00Z", headers=KEY).content.decode("utf-8-sig")
    assert len(later.strip().splitlines()) == 1  # the header only


def test_personal_data_is_masked_before_it_is_stored_or_logged(demo_model_dir, tmp_path, caplog):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}"))
    full_width_phone = "１３９１２３４５６７８"
    text = f"我叫张三，电话{PHONE}，身份证{ID_NUMBER}，邮箱{EMAIL}，备用电话{full_width_phone}，小区电梯坏了。"
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        wait_ready(client)
        stored = client.post(
            "/v1/feedback", json=feedback_body(text=text, title=f"电梯坏了 {PHONE}", clerk=EMAIL), headers=KEY
        )
        assert stored.status_code == 201
        export = client.get("/v1/feedback/export", headers=KEY).content.decode("utf-8-sig")
        rows = list(app.state.sanshi.store.rows())
    assert len(rows) == 1
    row = rows[0]
    for secret in (PHONE, ID_NUMBER, EMAIL, full_width_phone, "13912345678"):
        assert secret not in row.text + row.title + (row.clerk or "")
        assert secret not in export
        assert secret not in caplog.text
    assert "PHONE" in row.text and "IDNUM" in row.text and "EMAIL" in row.text
    assert row.text.startswith("我叫张三") and "小区电梯坏了" in row.text
    assert row.clerk == "EMAIL"


def test_export_is_a_csv_with_the_models_training_columns(served):
    served.post("/v1/feedback", json=feedback_body(id="EXP-1", received_at="2024-03-05T08:30:00+08:00"), headers=KEY)
    response = served.get("/v1/feedback/export", headers=KEY)
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))
    header = list(rows[0])
    assert header[:8] == ["工单编号", "标题", "诉求内容", "受理时间", "一级分类", "三事", "承办单位", "诉求类型"]
    mine = [r for r in rows if r["工单编号"] == "EXP-1"]
    assert len(mine) == 1
    assert mine[0]["承办单位"] == "社区居委会/村委会" and mine[0]["建议_承办单位"] == "住房和城乡建设局"
    assert mine[0]["受理时间"] == "2024-03-05 08:30:00"
    assert mine[0]["标题"] == TITLE and mine[0]["诉求内容"] == TEXT
    only_other = served.get("/v1/feedback/export?model_version=nothing-like-this", headers=KEY)
    assert list(csv.reader(io.StringIO(only_other.content.decode("utf-8-sig")))) == [header]


def test_corrections_from_the_export_train_the_next_model(demo_model_dir, tmp_path, repo_params):
    """Clerks correct suggestions; the export is appended to the demo data and `train` learns from both."""
    from sanshi_ml.data.records import ColumnMap, load_records
    from sanshi_ml.stages.train import train

    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}"))
    corrections = [
        ("路灯坏了", "小区门口的路灯坏了半个月，晚上很黑", "城乡建设", "共事", "社区居委会/村委会", "求助"),
        ("噪音", "楼下烧烤店每天营业到凌晨两点，油烟和噪音扰民", "环境保护", "公事", "生态环境局", "投诉"),
        ("工资", "公司拖欠我三个月工资，电话13800001111", "劳动和社会保障", "公事", "人力资源和社会保障局", "求助"),
        ("邻里", "邻居在楼道堆放杂物，多次沟通无果", "城乡建设", "家事", "网格/人民调解", "投诉"),
    ]
    with TestClient(app) as client:
        wait_ready(client)
        for number, (title, text, category, sanshi, unit, appeal) in enumerate(corrections):
            suggestion = client.post("/v1/suggest", json={"title": title, "text": text}).json()
            labels = {"category": category, "sanshi": sanshi, "unit": unit, "appeal": appeal}
            response = client.post(
                "/v1/feedback",
                headers=KEY,
                json={
                    "id": f"FB-{number}",
                    "title": title,
                    "text": text,
                    "model_version": suggestion["model_version"],
                    "suggestion": {
                        t: {"label": f["label"], "confidence": f["confidence"]} for t, f in suggestion["fields"].items()
                    },
                    "labels": labels,
                },
            )
            assert response.status_code == 201
        export = tmp_path / "feedback.csv"
        export.write_bytes(client.get("/v1/feedback/export", headers=KEY).content)

    columns = ColumnMap.from_config(repo_params.data.columns)
    loaded = load_records(export, columns)
    assert loaded.frame["id"].tolist() == [f"FB-{n}" for n in range(len(corrections))]
    for target, index in (("category", 2), ("sanshi", 3), ("unit", 4), ("appeal", 5)):
        assert loaded.frame[target].tolist() == [c[index] for c in corrections]
    assert "PHONE" in loaded.frame["text"][2] and "13800001111" not in export.read_text(encoding="utf-8-sig")

    result = train(
        [DEMO_CSV, export], repo_params, model_dir=tmp_path / "retrained", progress=lambda _m: None, track=False
    )
    demo_rows = len(load_records(DEMO_CSV, columns).frame) + len(load_records(DEMO_CSV, columns).report.empty_text_ids)
    assert result.records.report.rows_read == demo_rows + len(corrections)
    assert result.metadata["data"]["sources"] == [str(DEMO_CSV), str(export)]
    assert set(result.model.targets) == {"category", "sanshi", "unit", "appeal"}


# ----------------------------------------------------------------------------------------------- page and schema


def test_the_clerk_page_and_its_assets_are_served(served):
    page = served.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "诉求内容" in page.text and "/static/app.js" in page.text
    assert served.get("/static/app.js").status_code == 200
    assert served.get("/static/style.css").status_code == 200


def test_openapi_documents_limits_examples_and_errors(served):
    schema = served.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["SuggestRequest"]["properties"]["text"]["maxLength"] == 20_000
    assert components["SuggestRequest"]["additionalProperties"] is False
    assert components["BatchRequest"]["properties"]["records"]["maxItems"] == 256
    assert components["SuggestRequest"]["examples"]
    suggest = schema["paths"]["/v1/suggest"]["post"]["responses"]
    assert {"200", "400", "422", "503"} <= set(suggest)
    assert "401" in schema["paths"]["/v1/feedback"]["post"]["responses"]
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert served.get("/docs").status_code == 200


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    from serve.settings import Settings

    monkeypatch.setenv("SANSHI_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("SANSHI_MAX_BATCH", "8")
    monkeypatch.setenv("SANSHI_OPEN_SUGGESTIONS", "false")
    monkeypatch.setenv("SANSHI_API_KEY", "s3cret")
    settings = Settings()
    assert settings.model_dir == Path(tmp_path) and settings.max_batch == 8 and not settings.open_suggestions
    assert "s3cret" not in repr(settings)
    app = create_app(settings)
    schema = app.openapi()
    assert schema["components"]["schemas"]["BatchRequest"]["properties"]["records"]["maxItems"] == 8


# ------------------------------------------------------------------------------------ the store: durable or refused


def answer(text: str, **extra) -> dict:
    return {"text": text, "model_version": "store-test", "labels": {"sanshi": "共事"}, **extra}


def db_files(db: Path) -> list[Path]:
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]


def test_a_deleted_database_file_is_refused_not_written_into(demo_model_dir, tmp_path):
    db = tmp_path / "feedback.db"
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{db}"))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.post("/v1/feedback", headers=KEY, json=answer("删除之前的一条")).status_code == 201
        backup = tmp_path / "backup.db"
        with sqlite3.connect(db) as source, sqlite3.connect(backup) as target:
            source.backup(target)

        for path in db_files(db):
            path.unlink()
        refused = client.post("/v1/feedback", headers=KEY, json=answer("删除之后的一条"))
        assert refused.status_code == 503, refused.text
        problem = refused.json()["detail"][0]
        assert (problem["field"], problem["type"]) == ("store", "deleted")
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "store_unavailable" and ready.json()["store"]["status"] == "deleted"
        assert client.get("/v1/feedback/export", headers=KEY).status_code == 503
        assert not db.exists()  # not silently recreated as an empty database

        # The backup put back is another file: still refused until the server restarts on it.
        backup.rename(db)
        again = client.post("/v1/feedback", headers=KEY, json=answer("恢复文件后、重启之前"))
        assert again.status_code == 503 and again.json()["detail"][0]["type"] == "deleted"

    restarted = create_app(make_settings(demo_model_dir, f"sqlite:///{db}"))
    with TestClient(restarted) as client:
        wait_ready(client)
        assert client.post("/v1/feedback", headers=KEY, json=answer("重启之后的一条")).status_code == 201
        texts = [row.text for row in restarted.state.sanshi.store.rows()]
    assert texts == ["删除之前的一条", "重启之后的一条"]  # every 201 is there, and nothing else


def test_a_read_only_database_is_reported_by_ready_and_every_write_refused(demo_model_dir, tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(f"sqlite:///{db}")  # an existing database, with a row in it
    store.add(FeedbackEntry(text="只读之前", model_version="v0", labels={"sanshi": "家事"}))
    store.close()
    with read_only_file(db):
        app = create_app(make_settings(demo_model_dir, f"sqlite:///{db}"))
        with TestClient(app, raise_server_exceptions=False) as client:
            assert wait_settled(client)["status"] == "store_unavailable"
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["store"]["status"] == "read_only" and "read-only" in ready.json()["error"]
            refused = client.post("/v1/feedback", headers=KEY, json=answer("只读时的一条"))
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"][0]["type"] == "read_only"
            assert client.post("/v1/suggest", json={"text": "小区路灯坏了"}).status_code == 200


# --------------------------------------------------------------------------------------- logs, exports, error bodies


FORGED = "ERROR serve.store: feedback 999 stored by an attacker"


def test_a_client_value_cannot_forge_a_log_line(demo_model_dir, tmp_path, caplog):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}"))
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        wait_ready(client)
        for field in ("model_version", "clerk", "id"):
            for breaker in ("\n", "\r\n", "\u2028", "\x85"):
                response = client.post(
                    "/v1/feedback", headers=KEY, json=feedback_body(**{field: f"v1{breaker}{FORGED}"})
                )
                assert response.status_code in (201, 422), response.text
                if response.status_code == 422:
                    assert_error(response, 422, field)
    lines = caplog.text.splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], lines
    for record in caplog.records:  # no message, however formatted, spans two lines
        assert len(record.getMessage().splitlines()) <= 1, record.getMessage()


def test_the_log_filter_escapes_every_line_break_and_control_character():
    from serve.logs import EscapingFilter, escape

    assert escape("v1\nINFO forged\r\x1b[31m\u2028\x85") == "v1\\nINFO forged\\r\\x1b[31m\\u2028\\x85"
    assert escape("电梯 a\\b") == "电梯 a\\b"  # nothing to escape: the value as it is
    record = logging.LogRecord(
        "serve.store", logging.INFO, __file__, 1, "stored %d: model %s, %s", (7, "v1\nERROR forged", ["a\nb"]), None
    )
    assert EscapingFilter().filter(record)
    assert record.getMessage() == "stored 7: model v1\\nERROR forged, ['a\\nb']"  # a list's repr escapes itself


def test_exported_cells_cannot_run_as_spreadsheet_formulas(demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'f.db'}"))
    values = {
        "id": "@SUM(1+1)*cmd|' /C calc'!A0",
        "title": '=HYPERLINK("http://evil.example","点击")',
        "text": "+1 小区电梯坏了，-2 楼也停电",
        "labels": {"unit": "-社区居委会", "sanshi": "=共事"},
    }
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post("/v1/feedback", headers=KEY, json=feedback_body(**values)).status_code == 201
        export = client.get("/v1/feedback/export", headers=KEY).content.decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(export)))
    [first] = rows
    assert first["工单编号"] == "'" + values["id"]
    assert first["标题"] == "'" + values["title"]
    assert first["诉求内容"] == "'" + values["text"]
    assert first["承办单位"] == "'-社区居委会" and first["三事"] == "'=共事"
    assert first["建议_承办单位"] == "住房和城乡建设局"  # a safe cell stays exactly as it was
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


def test_error_bodies_list_the_first_ten_problems_and_count_them_all(served):
    records = [{"text": "电梯坏了", **{f"unknown_{n}": n for n in range(5)}} for _ in range(30)]
    response = served.post("/v1/suggest/batch", json={"records": records})
    body = assert_error(response, 422, "records.0.unknown_0", "unknown_field")
    assert len(body["detail"]) == 10 and body["total"] == 150
    assert "and 147 more" in body["message"]
    assert len(response.content) < 4_000


@pytest.mark.parametrize(
    ("payload", "field", "kind"),
    [
        pytest.param(
            {"records": [{"text": "a", **{f"f{n}": 0 for n in range(100)}}]},
            "records.0",
            "too_many_fields",
            id="too-many-fields",
        ),
        pytest.param(
            {"text": "a", "title": [[[[[[[[["deep"]]]]]]]]]}, "title.0.0.0.0.0.0.0", "too_deep", id="too-deep"
        ),
        pytest.param(
            {"records": [{"text": "a", "x": list(range(6_000))}]}, "body", "too_many_values", id="too-many-values"
        ),
    ],
)
def test_a_body_shaped_like_no_request_is_refused_before_validation(served, payload, field, kind):
    path = "/v1/suggest/batch" if "records" in payload else "/v1/suggest"
    response = served.post(path, json=payload)
    body = assert_error(response, 422, field, kind)
    assert body["total"] == 1


def test_each_endpoint_has_its_own_body_limit(served):
    # Far under the batch endpoint's limit, far over what one clerk's answer can be: refused before it is read.
    big = {**feedback_body(), "text": "电梯坏了" * 5_000, "padding": "x" * 600_000}
    assert_error(served.post("/v1/feedback", headers=KEY, json=big), 413, "body", "body_too_large")
    assert_error(served.post("/v1/suggest", json={"text": "a", "padding": "x" * 600_000}), 413, "body")


# ---------------------------------------------------------------------------------------------- intranet details


def test_probes_answer_head(served):
    for path in ("/health", "/ready"):
        response = served.head(path)
        assert response.status_code == 200, path
        assert response.content == b""


def test_pages_send_a_content_security_policy_and_refuse_frames(served):
    for path in ("/", "/docs", "/redoc"):
        headers = served.get(path).headers
        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'", path
        assert policy["script-src"] == "'self'", path  # no inline script, no other origin
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    page_policy = served.get("/").headers["content-security-policy"]
    assert "unsafe-inline" not in page_policy and "default-src 'none'" in page_policy
    assert served.get("/health").headers["x-content-type-options"] == "nosniff"


def test_the_api_docs_are_served_from_the_package_not_a_cdn(served):
    for path, assets in (("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]), ("/redoc", ["redoc.standalone.js"])):
        html = served.get(path).text
        assert "http://" not in html and "https://" not in html, html
        assert "<script>" not in html  # no inline script: the CSP forbids it
        for asset in assets:
            assert f"/docs-assets/{asset}" in html
            response = served.get(f"/docs-assets/{asset}")
            assert response.status_code == 200 and len(response.content) > 100_000
    assert served.get("/static/swagger-init.js").status_code == 200


def test_only_allowed_host_names_are_answered(demo_model_dir, tmp_path):
    settings = make_settings(
        demo_model_dir,
        f"sqlite:///{tmp_path / 'f.db'}",
        allowed_hosts=["testserver", "sanshi.intranet", "*.hotline.example"],
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "sanshi.intranet:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "a.hotline.example"}).status_code == 200
        for path in ("/", "/v1/model", "/docs"):
            refused = client.get(path, headers={"Host": "attacker.example"})
            assert_error(refused, 400, "Host", "invalid_host")
            assert "SANSHI_ALLOWED_HOSTS" in refused.json()["message"]
        # Probes answer whatever the Host: a load balancer or an orchestrator asks them by IP address.
        assert client.get("/health", headers={"Host": "10.0.0.7:8000"}).status_code == 200
        assert client.head("/ready", headers={"Host": "10.0.0.7:8000"}).status_code in (200, 503)


def test_the_default_allowed_hosts_are_localhost_and_the_bind_host(monkeypatch):
    from serve.settings import Settings

    monkeypatch.delenv("SANSHI_ALLOWED_HOSTS", raising=False)
    assert Settings(model_dir="m").trusted_hosts == ["localhost", "127.0.0.1", "[::1]"]
    assert "10.1.2.3" in Settings(model_dir="m", host="10.1.2.3").trusted_hosts
    monkeypatch.setenv("SANSHI_ALLOWED_HOSTS", "sanshi.intranet, *.hotline.example")
    assert Settings(model_dir="m").trusted_hosts == ["sanshi.intranet", "*.hotline.example"]
