"""The feedback store and the server against a real PostgreSQL server (a throwaway one started for the session).

Skipped when the PostgreSQL server binaries are missing, unless SANSHI_REQUIRE_POSTGRES=1 (as in CI), which fails.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from serve.app import create_app
from serve.store import FeedbackEntry, FeedbackStore, engine_url
from tests.system.serve_support import API_KEY, make_settings, postgres_url, wait_ready

__all__ = ["postgres_url"]  # the fixture, imported for pytest

PHONE, ID_NUMBER = "13912345678", "11010519491231002X"


def test_store_writes_and_streams_masked_rows_in_postgres(postgres_url):
    store = FeedbackStore(postgres_url)
    assert store.engine.dialect.name == "postgresql" and store.engine.dialect.driver == "psycopg"
    store.add(FeedbackEntry(text=f"电话{PHONE}，身份证{ID_NUMBER}\x00，井盖丢了", title="井盖", model_version="pg1",
                            labels={"sanshi": "公事", "unit": "城市管理和综合执法局"},
                            suggestion={"sanshi": {"label": "公事", "confidence": 0.97}},
                            received_at=datetime(2024, 5, 1, 9, 0, tzinfo=timezone(timedelta(hours=8)))))
    for number in range(4):
        store.add(FeedbackEntry(text=f"第{number}条", model_version="pg2", labels={"sanshi": "家事"}))
    rows = list(store.rows(chunk=2))
    assert [r.model_version for r in rows] == ["pg1", "pg2", "pg2", "pg2", "pg2"]
    first = rows[0]
    assert first.text == "电话 PHONE ，身份证 IDNUM ，井盖丢了"  # NUL dropped: PostgreSQL refuses it in text
    assert first.suggestion == {"sanshi": {"label": "公事", "confidence": 0.97}}
    assert first.corrected == ["unit"] and first.received_at == datetime(2024, 5, 1, 9, 0)
    assert first.created_at.tzinfo is not None
    assert len(list(store.rows(model_version="pg2"))) == 4
    store.close()

    # What is in the database itself, read without the store: nothing personal.
    engine = create_engine(engine_url(postgres_url))
    with engine.connect() as connection:
        dumped = " ".join(str(row) for row in connection.execute(text("SELECT * FROM sanshi_feedback")))
    engine.dispose()
    assert PHONE not in dumped and ID_NUMBER not in dumped and "PHONE" in dumped


def test_the_server_keeps_feedback_in_postgres_and_exports_it(postgres_url, demo_model_dir):
    app = create_app(make_settings(demo_model_dir, postgres_url))
    with TestClient(app) as client:
        wait_ready(client)
        suggestion = client.post("/v1/suggest", json={"title": "路灯", "text": "小区门口路灯坏了半个月"}).json()
        response = client.post("/v1/feedback", headers={"X-API-Key": API_KEY}, json={
            "id": "PG-1", "title": "路灯", "text": f"小区门口路灯坏了半个月，联系电话{PHONE}",
            "model_version": suggestion["model_version"],
            "suggestion": {t: {"label": f["label"], "confidence": f["confidence"]}
                           for t, f in suggestion["fields"].items()},
            "labels": {"category": "城乡建设", "sanshi": "共事", "unit": "社区居委会/村委会", "appeal": "求助"}})
        assert response.status_code == 201
        export = client.get("/v1/feedback/export", headers={"X-API-Key": API_KEY}).content.decode("utf-8-sig")
    rows = {row["工单编号"]: row for row in csv.DictReader(io.StringIO(export))}
    assert rows["PG-1"]["诉求内容"] == "小区门口路灯坏了半个月，联系电话 PHONE"
    assert rows["PG-1"]["三事"] == "共事" and rows["PG-1"]["模型版本"] == suggestion["model_version"]
