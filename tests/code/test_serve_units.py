"""Unit tests of the server's parts: settings, request models, the feedback store (SQLite), the export layout and the
micro-batcher (with the real demo model)."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from serve.batcher import MicroBatcher
from serve.export import ExportLayout, csv_chunks
from serve.schemas import build_request_models, parse_timestamp
from serve.settings import Settings
from serve.store import FeedbackEntry, FeedbackStore, StoreError, clean, engine_url

# --------------------------------------------------------------------------------------------------------- settings


def test_settings_refuse_two_model_sources():
    with pytest.raises(ValidationError, match="either model_dir"):
        Settings(model_dir="models/demo", model_uri="models:/sanshi-triage@champion")


def test_settings_load_layers_explicit_over_environment_over_params(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(
        "serve:\n  max_text_chars: 500\n  max_batch: 16\n  top_k: 2\ntrain:\n  model_dir: models/x\n", encoding="utf-8"
    )
    monkeypatch.delenv("SANSHI_MODEL_DIR", raising=False)
    monkeypatch.delenv("SANSHI_MODEL_URI", raising=False)
    monkeypatch.setenv("SANSHI_MAX_BATCH", "4")
    settings = Settings.load(params)
    assert (settings.max_text_chars, settings.max_batch, settings.top_k) == (500, 4, 2)
    assert str(settings.model_dir) == "models/x"  # nothing chosen: the model `train` writes by default
    chosen = Settings.load(params, model_uri="models:/sanshi-triage@champion", max_text_chars=100)
    assert chosen.model_dir is None and chosen.max_text_chars == 100


def test_default_body_limit_fits_a_full_batch_of_escaped_texts():
    settings = Settings(model_dir="m")
    assert settings.body_limit >= settings.max_batch * settings.max_text_chars * 6


# --------------------------------------------------------------------------------------------------- request models


def test_request_models_carry_the_limits_and_name_the_targets():
    models = build_request_models(max_text_chars=10, max_batch=2, strict=True, targets=["sanshi", "一级分类"])
    with pytest.raises(ValidationError) as error:
        models.BatchRequest.model_validate({"records": [{"text": "a"}] * 3})
    assert error.value.errors()[0]["loc"] == ("records",)
    with pytest.raises(ValidationError):
        models.SuggestRequest.model_validate({"text": "x" * 11})
    ok = models.FeedbackRequest.model_validate(
        {"text": "电梯", "model_version": "v", "labels": {"一级分类": "城乡建设"}}
    )
    assert ok.labels.model_dump(by_alias=True, exclude_none=True) == {"一级分类": "城乡建设"}
    with pytest.raises(ValidationError) as error:
        models.FeedbackRequest.model_validate({"text": "电梯", "model_version": "v", "labels": {"unit": "x"}})
    assert ("labels", "unit") in [e["loc"] for e in error.value.errors()]
    schema = models.FeedbackRequest.model_json_schema()
    assert set(schema["$defs"]["Labels"]["properties"]) == {"sanshi", "一级分类"}


def test_without_known_targets_labels_are_a_mapping():
    models = build_request_models(max_text_chars=100, max_batch=2, strict=False, targets=None)
    body = models.FeedbackRequest.model_validate(
        {"text": "电梯", "model_version": "v", "labels": {"any": "x"}, "unknown_field": 1}
    )
    assert body.labels == {"any": "x"}
    with pytest.raises(ValidationError):
        models.FeedbackRequest.model_validate({"text": "电梯", "model_version": "v", "labels": {"any": " "}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-05T08:30:00+08:00", datetime(2024, 3, 5, 8, 30, tzinfo=timezone(timedelta(hours=8)))),
        ("2024-03-05t00:30:00.1234567z", datetime(2024, 3, 5, 0, 30, 0, 123456, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_timestamps_are_rfc3339(value, expected):
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "2024-03-05",
        "2024-03-05 08:30:00",
        "2024-03-05T08:30:00",
        "1709600000",
        "2024-02-30T00:00:00Z",
        "2024-03-05T08:30:00+25:00",
        1709600000,
    ],
)
def test_timestamps_without_offset_or_impossible_are_refused(value):
    with pytest.raises(ValueError):
        parse_timestamp(value)


# ------------------------------------------------------------------------------------------------------------ store


def test_clean_masks_personal_data_written_any_way_and_keeps_the_rest():
    text = "张三，电话１３８１２３４５６７８；身份证430102199001011234，邮箱ａ.ｂ＠ｅｘａｍｐｌｅ.com\x00。\n第二行"
    cleaned = clean(text)
    assert cleaned == "张三，电话 PHONE ；身份证 IDNUM ，邮箱 EMAIL 。\n第二行"
    assert clean(None) == "" and clean("") == ""


def test_engine_url_uses_psycopg_3():
    assert engine_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_bad_database_url_is_reported_without_its_password():
    with pytest.raises(StoreError) as error:
        FeedbackStore("nosuchdb://user:hunter2@host/db")
    assert "hunter2" not in str(error.value)


def entry(**overrides) -> FeedbackEntry:
    values = {
        "text": "电梯坏了，电话13812345678",
        "title": "电梯",
        "model_version": "v1",
        "labels": {"sanshi": "共事", "unit": "社区居委会/村委会"},
        "suggestion": {"sanshi": {"label": "共事", "confidence": 0.9}, "unit": {"label": "住房和城乡建设局"}},
    }
    return FeedbackEntry(**{**values, **overrides})


def test_store_keeps_version_suggestion_answer_and_time_masked(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'sub' / 'feedback.db'}")
    before = datetime.now(UTC)
    row = store.add(entry(received_at=datetime(2024, 3, 5, 8, 30, tzinfo=timezone(timedelta(hours=8)))))
    assert row.id == 1 and row.corrected == ["unit"]
    [stored] = list(store.rows())
    assert stored.text == "电梯坏了，电话 PHONE" and "13812345678" not in str(stored.suggestion)
    assert stored.model_version == "v1"
    assert stored.suggestion["unit"] == {"label": "住房和城乡建设局", "confidence": None}
    assert stored.labels == {"sanshi": "共事", "unit": "社区居委会/村委会"}
    assert stored.received_at == datetime(2024, 3, 5, 8, 30)  # the wall-clock time as given
    assert before - timedelta(seconds=1) <= stored.created_at <= datetime.now(UTC)
    assert store.count() == 1
    store.close()


def test_store_streams_rows_in_order_with_filters(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    for number in range(7):
        store.add(entry(record_id=f"R{number}", model_version="v2" if number % 2 else "v1"))
    assert [r.record_id for r in store.rows(chunk=3)] == [f"R{n}" for n in range(7)]
    assert [r.record_id for r in store.rows(model_version="v2", chunk=2)] == ["R1", "R3", "R5"]
    future = datetime.now(timezone(timedelta(hours=8))) + timedelta(hours=1)
    assert list(store.rows(since=future)) == []
    assert len(list(store.rows(until=future))) == 7
    store.close()


# ----------------------------------------------------------------------------------------------------------- export


def test_export_layout_follows_the_models_columns(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.add(entry(record_id="R1"))
    store.add(entry())
    petitions = {
        "columns": {
            "id_col": "留言编号",
            "text_cols": ["留言主题", "留言详情"],
            "time_col": "留言时间",
            "targets": {"sanshi": "三事", "unit": "承办单位"},
        }
    }
    layout = ExportLayout.from_metadata(petitions, ["sanshi", "unit"])
    rows = list(csv.reader(io.StringIO(b"".join(csv_chunks(layout, store.rows())).decode("utf-8-sig"))))
    assert rows[0][:6] == ["留言编号", "留言主题", "留言详情", "留言时间", "三事", "承办单位"]
    assert rows[1][:3] == ["R1", "电梯", "电梯坏了，电话 PHONE"] and rows[1][4:6] == ["共事", "社区居委会/村委会"]
    assert rows[2][0] == "FB2"  # no record id given: the feedback id stands in
    single = ExportLayout.from_metadata({"columns": {"text_cols": ["内容"], "targets": {}}}, ["sanshi", "urgency"])
    rows = list(csv.reader(io.StringIO(b"".join(csv_chunks(single, store.rows(), bom=False)).decode("utf-8"))))
    assert rows[0][:5] == ["工单编号", "内容", "受理时间", "三事", "urgency"]  # unnamed targets keep their name
    assert rows[1][1] == "电梯\n电梯坏了，电话 PHONE"  # title and text joined the way training joins them
    segmented = ExportLayout.from_metadata({"columns": {"text_cols": [], "segmented_col": "分词"}}, ["sanshi"])
    rows = list(
        csv.reader(
            io.StringIO(b"".join(csv_chunks(segmented, store.rows(), segment=lambda t: "电梯 坏")).decode("utf-8-sig"))
        )
    )
    assert rows[0][:3] == ["工单编号", "分词", "受理时间"] and rows[1][1] == "电梯 坏"
    store.close()


# ---------------------------------------------------------------------------------------------------------- batcher


def test_the_batcher_answers_concurrent_jobs_in_fewer_calls_with_the_same_results(demo_model_dir):
    from sanshi_ml.artifacts import load_model
    from sanshi_ml.suggest import Suggester

    suggester = Suggester.from_loaded(load_model(demo_model_dir))
    jobs = [
        [(None, "电梯坏了物业不修")],
        [("噪音", "楼上每天深夜拖动家具")],
        [(None, "路灯不亮"), (None, "拖欠工资")],
        [(None, "垃圾没人清运")],
        [(None, "小区停车位被占")],
    ]
    top_ks = [3, 1, 2, 3, 5]

    async def run() -> tuple[list, MicroBatcher]:
        batcher = MicroBatcher(lambda records, k: suggester.suggest(records, top_k=k), max_records=4)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(job, k) for job, k in zip(jobs, top_ks)))
        finally:
            await batcher.stop()
        return results, batcher

    results, batcher = asyncio.run(run())
    assert batcher.records == 6 and batcher.calls < len(jobs)
    for job, k, result in zip(jobs, top_ks, results):
        assert result == suggester.suggest(job, top_k=k)


def test_a_failing_batch_fails_its_requests_instead_of_hanging():
    def broken(records, k):
        raise RuntimeError("model exploded")

    async def run() -> None:
        batcher = MicroBatcher(broken)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="exploded"):
                await asyncio.wait_for(batcher.submit([(None, "x")], 3), timeout=5)
            assert batcher.calls == 0
        finally:
            await batcher.stop()

    asyncio.run(run())


def test_a_big_job_is_cut_into_calls_and_gets_the_same_answers(demo_model_dir):
    from sanshi_ml.artifacts import load_model
    from sanshi_ml.suggest import Suggester

    suggester = Suggester.from_loaded(load_model(demo_model_dir))
    records = [(None, f"第{n}号楼电梯坏了，物业一直不修，" * (n % 4 + 1)) for n in range(23)]
    calls: list[int] = []

    def suggest(batch, k):
        calls.append(len(batch))
        return suggester.suggest(batch, top_k=k)

    async def run() -> list:
        batcher = MicroBatcher(suggest, max_records=5, max_chars=120)
        batcher.start()
        try:
            return await batcher.submit(records, 2)
        finally:
            await batcher.stop()

    result = asyncio.run(run())
    assert result == suggester.suggest(records, top_k=2)
    assert len(calls) > 4 and max(calls) <= 5 and sum(calls) == len(records)


def test_single_suggestions_go_between_the_pieces_of_a_big_job():
    import threading
    import time

    order: list[str] = []
    lock = threading.Lock()

    def slow(batch, k):  # 20 ms a call, whatever its size
        time.sleep(0.02)
        with lock:
            order.extend(text for _, text in batch)
        return [{"text": text} for _, text in batch]

    async def run() -> tuple[float, float]:
        batcher = MicroBatcher(slow, max_records=2)
        batcher.start()
        try:
            started = time.perf_counter()
            big = asyncio.ensure_future(batcher.submit([(None, f"big{n}") for n in range(20)], 1))
            await asyncio.sleep(0.03)  # the big job is under way
            small = await batcher.submit([(None, "small")], 1)
            small_done = time.perf_counter() - started
            assert small == [{"text": "small"}]
            assert [r["text"] for r in await big] == [f"big{n}" for n in range(20)]
            return small_done, time.perf_counter() - started
        finally:
            await batcher.stop()

    small_done, big_done = asyncio.run(run())
    assert small_done < big_done / 2  # answered between two pieces, not after the whole job
    assert order.index("small") < order.index("big19")


def test_the_event_loop_runs_while_the_model_works():
    import time

    def busy(batch, k):  # the model, holding its thread for 0.3 s
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            pass
        return [{} for _ in batch]

    async def run() -> int:
        batcher = MicroBatcher(busy)
        batcher.start()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        try:
            await batcher.submit([(None, "x")], 1)
        finally:
            ticker.cancel()
            await batcher.stop()
        return ticks

    assert asyncio.run(run()) >= 10  # the loop kept ticking during the 0.3 s call


# ------------------------------------------------------------------------------------------- durable or refused


def test_the_store_check_writes_and_reads_back_and_notices_a_deleted_file(tmp_path):
    from serve.store import StoreUnavailable

    db = tmp_path / "feedback.db"
    store = FeedbackStore(f"sqlite:///{db}")
    assert store.check().ok
    db.unlink()
    health = store.check()
    assert health.reason == "deleted" and "restart" in health.message
    with pytest.raises(StoreUnavailable) as error:
        store.add(entry())
    assert error.value.reason == "deleted"
    assert not db.exists()  # never recreated
    store.close()


def test_database_errors_are_classified_by_code_and_described_without_their_message(tmp_path):
    import sqlite3

    from serve.logs import describe_exception
    from serve.store import classify

    connection = sqlite3.connect(tmp_path / "full.db")
    connection.execute("CREATE TABLE t (x TEXT)")
    connection.execute("PRAGMA max_page_count = 2")
    secret = "王小明住在幸福路88号"
    with pytest.raises(sqlite3.OperationalError) as full:
        for _ in range(50):
            connection.execute("INSERT INTO t VALUES (?)", (secret * 200,))
    connection.close()
    assert classify(full.value)[0] == "full"
    described = describe_exception(full.value)
    assert "OperationalError [SQLITE_FULL]" in described and secret not in described and "full" not in described
    with pytest.raises(sqlite3.OperationalError) as missing:
        sqlite3.connect(f"file:{tmp_path / 'none.db'}?mode=rw", uri=True)
    assert classify(missing.value)[0] == "deleted"


# ------------------------------------------------------------------------------------------ exports and requests


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+86 138", "'+86 138"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("电梯坏了 =1", "电梯坏了 =1"),
        ("", ""),
        ("'=x", "'=x"),
    ],
)
def test_spreadsheet_cells_never_start_a_formula(cell, expected):
    from serve.export import spreadsheet_safe

    assert spreadsheet_safe(cell) == expected


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"records": [' + b",".join([b'{"text": "a"}'] * 3000) + b"]}", "too_many_values"),
        (b'{"x": [' + b"1," * 9000 + b"1]}", "too_many_values"),
        (b'{"text": "a\\\\", "x": [' + b"1," * 9000 + b"1]}", "too_many_values"),  # an escaped backslash, then more
        (b"[" * 9 + b"]" * 9, "too_deep"),
    ],
)
def test_a_body_is_measured_before_it_is_parsed(body, kind):
    from serve.app import ApiError, prescan_json

    with pytest.raises(ApiError) as error:
        prescan_json(body, 5_000)
    assert error.value.kind == kind


def test_the_prescan_passes_every_valid_request_shape():
    import json

    from serve.app import parse_json_body, prescan_json

    texts = ['他说："电梯坏了\\"", 还有\\\\反斜杠', "{[逗号, 冒号: 括号]}" * 50, "普通的诉求"]
    for ensure_ascii in (True, False):
        body = json.dumps(
            {"records": [{"id": str(n), "title": t, "text": t} for n, t in enumerate(texts * 80)]},
            ensure_ascii=ensure_ascii,
        )
        for encoded in (body.encode(), body.encode("utf-16")):
            prescan_json(encoded, 5_000)  # passes
            assert parse_json_body(encoded, 5_000) == json.loads(body)


def test_allowed_hosts_refuse_a_malformed_wildcard():
    with pytest.raises(ValidationError, match="wildcard"):
        Settings(model_dir="m", allowed_hosts="sanshi.*.org")
