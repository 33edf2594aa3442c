"""The feedback store and the server against a real PostgreSQL server (a throwaway one started for the session).

Skipped when the PostgreSQL server binaries are missing, unless SANSHI_REQUIRE_POSTGRES=1 (as in CI), which fails.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from serve.app import create_app
from serve.store import FeedbackEntry, FeedbackStore, engine_url
from tests.system.serve_support import API_KEY, make_settings, postgres_server, postgres_url, wait_ready

__all__ = ["postgres_server", "postgres_url"]  # the fixtures, imported for pytest

PHONE, ID_NUMBER = "13912345678", "11010519491231002X"


def test_store_writes_and_streams_masked_rows_in_postgres(postgres_url):
    store = FeedbackStore(postgres_url)
    assert store.engine.dialect.name == "postgresql" and store.engine.dialect.driver == "psycopg"
    store.add(
        FeedbackEntry(
            text=f"电话{PHONE}，身份证{ID_NUMBER}\x00，井盖丢了",
            title="井盖",
            model_version="pg1",
            labels={"sanshi": "公事", "unit": "城市管理和综合执法局"},
            suggestion={"sanshi": {"label": "公事", "confidence": 0.97}},
            received_at=datetime(2024, 5, 1, 9, 0, tzinfo=timezone(timedelta(hours=8))),
        )
    )
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
        response = client.post(
            "/v1/feedback",
            headers={"X-API-Key": API_KEY},
            json={
                "id": "PG-1",
                "title": "路灯",
                "text": f"小区门口路灯坏了半个月，联系电话{PHONE}",
                "model_version": suggestion["model_version"],
                "suggestion": {
                    t: {"label": f["label"], "confidence": f["confidence"]} for t, f in suggestion["fields"].items()
                },
                "labels": {"category": "城乡建设", "sanshi": "共事", "unit": "社区居委会/村委会", "appeal": "求助"},
            },
        )
        assert response.status_code == 201
        export = client.get("/v1/feedback/export", headers={"X-API-Key": API_KEY}).content.decode("utf-8-sig")
    rows = {row["工单编号"]: row for row in csv.DictReader(io.StringIO(export))}
    assert rows["PG-1"]["诉求内容"] == "小区门口路灯坏了半个月，联系电话 PHONE"
    assert rows["PG-1"]["三事"] == "共事" and rows["PG-1"]["模型版本"] == suggestion["model_version"]


def answer(text_value: str, **extra) -> dict:
    return {"text": text_value, "model_version": "pg-outage", "labels": {"sanshi": "共事"}, **extra}


def wait_for_ready(client, status: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/ready")
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_feedback_is_refused_while_postgres_is_away_and_taken_again_when_it_is_back(postgres_server, demo_model_dir):
    """Connection lost, then back: never a 500, never a 201 for a row that is not there."""
    app = create_app(make_settings(demo_model_dir, postgres_server.url, store_check_seconds=0))
    key = {"X-API-Key": API_KEY}
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.post("/v1/feedback", headers=key, json=answer("停电之前")).status_code == 201

        # Every server connection killed under the pool: the next write reconnects (pre-ping) and lands.
        postgres_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = 'sanshi_feedback' AND pid <> pg_backend_pid()"
        )
        assert client.post("/v1/feedback", headers=key, json=answer("连接被断开之后")).status_code == 201

        postgres_server.stop()
        try:
            refused = client.post("/v1/feedback", headers=key, json=answer("数据库停机期间"))
            assert refused.status_code == 503, refused.text
            problem = refused.json()["detail"][0]
            assert (problem["field"], problem["type"]) == ("store", "unreachable")
            assert refused.headers["retry-after"]
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "store_unavailable" and ready.json()["store"]["status"] == "unreachable"
            assert (
                client.post("/v1/suggest", json={"text": "小区路灯坏了"}).status_code == 200
            )  # the model still answers
            assert client.get("/v1/feedback/export", headers=key).status_code == 503
        finally:
            postgres_server.start()

        assert wait_for_ready(client, 200).status_code == 200
        assert client.post("/v1/feedback", headers=key, json=answer("恢复之后")).status_code == 201
        export = client.get("/v1/feedback/export?model_version=pg-outage", headers=key).content.decode("utf-8-sig")
    texts = [row["诉求内容"] for row in csv.DictReader(io.StringIO(export))]
    assert texts == ["停电之前", "连接被断开之后", "恢复之后"]  # the refused one is not there, every 201 is


PLANTED = ("王小明", "幸福路88号3单元502室", "430102900101123")  # a name, an address, a 15-digit 身份证 number


def test_a_write_refused_by_a_read_only_postgres_is_a_503_and_logs_nothing_the_resident_wrote(
    postgres_server, demo_model_dir, caplog
):
    app = create_app(make_settings(demo_model_dir, postgres_server.url, store_check_seconds=0))
    key = {"X-API-Key": API_KEY}
    text_value = f"我叫{PLANTED[0]}，住在{PLANTED[1]}，身份证{PLANTED[2]}，楼道灯坏了。"
    with caplog.at_level(logging.DEBUG), TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        try:
            postgres_server.execute(
                "ALTER DATABASE sanshi_feedback SET default_transaction_read_only = on",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'sanshi_feedback' AND pid <> pg_backend_pid()",
            )
            refused = client.post("/v1/feedback", headers=key, json=answer(text_value, title=PLANTED[1]))
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"][0]["type"] == "read_only"
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["store"]["status"] == "read_only"
        finally:
            postgres_server.execute(
                "ALTER DATABASE sanshi_feedback RESET default_transaction_read_only",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'sanshi_feedback' AND pid <> pg_backend_pid()",
            )
        assert wait_for_ready(client, 200).status_code == 200
    assert "read_only" in caplog.text  # the failure is logged …
    for planted in PLANTED:  # … without a word of the request
        assert planted not in caplog.text
        assert planted not in refused.text
