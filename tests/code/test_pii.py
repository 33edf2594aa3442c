"""Personal-data masking: what must be masked, what must be left alone, and where a planted value must never arrive.

Issue 15 ("nothing lost, nothing leaked"): a legacy 15-digit 身份证 number, a phone number split by an invisible
character, and a phone number written as 133.1234.5678 or with several spaces reached the model, the logs and the
feedback database unmasked.
"""

from __future__ import annotations

import re

import pytest

from sanshi_ml.core.text import PII_PLACEHOLDERS, mask_pii, normalize, normalize_many

PLACEHOLDERS = re.compile("|".join(sorted(set(PII_PLACEHOLDERS.values()))))
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\U000e0020"]

# Planted values: distinctive digit groups, so a grep for them finds nothing but the planted value.
ID_15 = "430102870315246"  # 湖南长沙芙蓉区, born 1987-03-15, sequence 246
PHONE_GROUPS = ("137", "2468", "1357")
SPLIT_PHONE = "\u200b".join(PHONE_GROUPS)


def digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


@pytest.mark.parametrize(
    "raw",
    [
        f"身份证{ID_15}",
        f"身份证号:{ID_15}。",
        f"ID {ID_15}",
        "证件号码110105491231002请核实",
        "652801000229123",
    ],
)
def test_legacy_15_digit_id_number_is_masked(raw):
    assert "IDNUM" in mask_pii(raw) and "IDNUM" in normalize(raw)
    assert not digits(normalize(raw)), normalize(raw)


@pytest.mark.parametrize("invisible", INVISIBLE)
def test_phone_id_and_email_split_by_an_invisible_character_are_masked(invisible):
    phone = invisible.join(PHONE_GROUPS)
    for raw, placeholder in [
        (f"我的手机{phone}请回电", "PHONE"),
        (f"手机{invisible}{invisible}13724681357", "PHONE"),
        (f"身份证4301{invisible}0219900101123X", "IDNUM"),
        (f"身份证{ID_15[:7]}{invisible}{ID_15[7:]}", "IDNUM"),
        (f"座机0731-{invisible}88880000", "PHONE"),
        (f"邮箱zhang{invisible}@example.com", "EMAIL"),
        (f"车牌湘{invisible}A12345", "PLATE"),
    ]:
        for masked in (mask_pii(raw), normalize(raw), normalize_many([raw] * 20)[0]):
            assert placeholder in masked, (raw, masked)
            assert not digits(masked), (raw, masked)
            assert invisible not in masked


@pytest.mark.parametrize(
    "phone",
    [
        "133.1234.5678",
        "133 1234 5678",
        "133-1234-5678",
        "133  1234  5678",
        "133 - 1234 - 5678",
        "+86 133.1234.5678",
        "133   1234   5678",
    ],
)
def test_phone_written_with_dots_spaces_or_hyphens_is_masked(phone):
    for masked in (mask_pii(f"联系电话{phone}谢谢"), normalize(f"联系电话{phone}谢谢")):
        assert "PHONE" in masked and not digits(masked.replace("86", "")), masked


@pytest.mark.parametrize(
    "text",
    [
        "2019.04.08",
        "2019-04-08 14:06:22",
        "2019/3/20 17:42:38",
        "2019年4月15日",
        "2019.4.8至2020.12.31",
        "欠薪12000元",
        "共计1,350.50元",
        "￥13,800.00",
        "金额138000元",
        "工单编号D2023000026",
        "编号20190415",
        "3栋2单元502",
        "3栋2单元502室",
        "A3区12栋1302房",
        "共135人",
        "138户居民",
        "2020年",
        "1998-2019年",
        "经度130.12345678",
        "纬度13.1234",
        "13.1234.5678",
        "133.12345678",
        "V1.3.0",
        "192.168.1.100",
        "快递单号773012345678901",
        "订单号2019040812345678",
        "营业执照号110108012399123",  # 15 digits, month 23
        "第13812号文件",
        "0000-00000000",
        "0731——0000-00000000",
        "邮编410000",
        "1380000123",
        "138000012345",
    ],
)
def test_ordinary_numbers_are_left_alone(text):
    assert mask_pii(text) == text
    assert not PLACEHOLDERS.search(normalize(text)), normalize(text)


def test_invisible_characters_away_from_personal_data_are_kept():
    # Between Chinese characters and inside an emoji sequence they are none of masking's business.
    for text in ["咨询G7县办理\u200b户口迁移证", "家庭\u200d👨\u200d👩\u200d👧", "社区\ufeff通知", "电梯\u00ad坏了"]:
        assert mask_pii(text) == text


def test_masking_is_idempotent():
    raw = f"手机{SPLIT_PHONE}，身份证{ID_15}，电话133.1234.5678，邮箱a\u200b@b.cn"
    once = mask_pii(raw)
    assert mask_pii(once) == once and not digits(once)


def test_planted_values_never_reach_the_model_tokens(demo_model_dir):
    from sanshi_ml.artifacts import load_model
    from sanshi_ml.data.records import model_input

    model = load_model(demo_model_dir).model
    texts = [
        model_input(f"身份证{ID_15}", f"电梯坏了，手机{SPLIT_PHONE}，身份证{ID_15}请回电"),
        f"电话{'.'.join(PHONE_GROUPS)}，证件{ID_15[:6]}\u2060{ID_15[6:]}",
    ]
    tokens = [
        token
        for batch in (model.tokens(texts), model.title_tokens(texts), model.tokens(texts * 10))
        for row in batch
        for token in row
    ]
    assert "PHONE" in tokens and "IDNUM" in tokens
    joined = " ".join(tokens)
    for planted in (ID_15, ID_15[:6], ID_15[-9:], *PHONE_GROUPS[1:]):
        assert planted not in joined, planted
    assert not any(ch.isdigit() for token in tokens for ch in token)


def test_planted_values_never_reach_the_feedback_database_file(tmp_path):
    from serve.store import FeedbackEntry, FeedbackStore

    path = tmp_path / "feedback.db"
    store = FeedbackStore(f"sqlite:///{path}")
    joined_phone = "\u2060".join(PHONE_GROUPS)
    store.add(
        FeedbackEntry(
            text=f"电梯坏了一个月，手机{SPLIT_PHONE}，身份证{ID_15}，座机0731\u00ad-88880000，电话133.1234.5678",
            title=f"电梯故障{ID_15}",
            record_id="R1",
            model_version="v1",
            clerk=f"张三 {joined_phone}",
            labels={"sanshi": "共事"},
            suggestion={"sanshi": {"label": "共事", "confidence": 0.9}},
        )
    )
    [row] = list(store.rows())
    assert "PHONE" in row.text and "IDNUM" in row.text and "IDNUM" in row.title
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("feedback.db"))
    assert "电梯坏了一个月".encode() in stored  # the row is in the file, in UTF-8
    for planted in (ID_15, ID_15[:8], ID_15[-7:], "1234.5678", "88880000"):
        assert planted.encode() not in stored, planted
    # the phone's groups, with anything but a digit between them (a timestamp's digits may hold a group by chance)
    assert not re.search(rb"137\D{0,6}2468|2468\D{0,6}1357", stored)
