"""Data tests: the schema and label sets of the real files in ../shared/data, and segmenter agreement on them."""

import difflib
import re

import pandas as pd
import pytest

from sanshi_ml.core.policy import load_policy
from sanshi_ml.core.text import Segmenter, normalize
from sanshi_ml.data.records import ColumnMap, compose, load_records, read_table
from tests.conftest import PETITION_TARGETS, SHARED_DATA, require

pytestmark = pytest.mark.real_data

CATEGORIES_15 = {
    "城乡建设",
    "教育文体",
    "政法",
    "环境保护",
    "劳动和社会保障",
    "交通运输",
    "商贸旅游",
    "农村农业",
    "经济管理",
    "卫生计生",
    "民政",
    "国土资源",
    "党务政务",
    "科技与信息产业",
    "纪检监察",
}
APPEALS = {"投诉", "举报", "求助", "咨询", "建议"}


@pytest.fixture(scope="module")
def petitions(petitions_csv) -> pd.DataFrame:
    return read_table(petitions_csv)


@pytest.fixture(scope="module")
def taxonomy() -> pd.DataFrame:
    return read_table(require(SHARED_DATA / "tipdm2020_c" / "fj1_label_taxonomy.csv"))


def test_petitions_columns_and_size(petitions):
    expected = [
        "留言编号",
        "来源",
        "留言用户",
        "留言主题",
        "留言时间",
        "留言详情",
        "答复意见",
        "答复时间",
        "点赞数",
        "反对数",
        "一级分类",
        "二级分类",
        "三事",
        "承办单位",
        "诉求类型",
        "标注置信度",
    ]
    assert list(petitions.columns) == expected
    assert len(petitions) == 7064
    assert petitions["留言编号"].is_unique


def test_petitions_label_sets(petitions):
    assert set(petitions["一级分类"]) == CATEGORIES_15
    assert set(petitions["三事"]) == {"公事", "共事", "家事"}
    assert set(petitions["诉求类型"]) == APPEALS
    assert set(petitions["标注置信度"]) == {"high", "low"}
    assert petitions[["一级分类", "三事", "承办单位", "诉求类型"]].notna().all().all()


def test_every_unit_is_in_the_default_responsibility_list(petitions):
    policy = load_policy()
    assert set(petitions["承办单位"]) == set(policy.units)
    assert len(set(petitions["承办单位"])) == 25


def test_unit_and_sanshi_agree_with_the_list_for_shared_and_household_matters(petitions):
    policy = load_policy()
    gongshi = petitions[petitions["三事"] == "共事"]
    jiashi = petitions[petitions["三事"] == "家事"]
    assert (gongshi["承办单位"].map(policy.expected_class) == "共事").all()
    assert (jiashi["承办单位"].map(policy.expected_class) == "家事").all()


def test_category_pairs_are_in_the_taxonomy(petitions, taxonomy):
    assert list(taxonomy.columns) == ["一级分类", "二级分类", "三级分类"]
    pairs = set(zip(taxonomy["一级分类"], taxonomy["二级分类"]))
    assert set(zip(petitions["一级分类"], petitions["二级分类"])) <= pairs
    assert set(taxonomy["一级分类"]) == CATEGORIES_15


def test_petitions_load_through_the_record_schema(petitions_csv):
    records = load_records(petitions_csv, ColumnMap(text_cols=("留言主题", "留言详情"), targets=PETITION_TARGETS))
    assert len(records) == 7064 and not records.report.empty_text_ids
    assert records.report.duplicate_rows > 0  # reposts exist and are kept together by the split
    assert records.frame["received_at"].notna().mean() > 0.99
    assert records.frame["received_at"].dt.year.between(2010, 2020).all()


def test_fj2_schema_and_official_labels(fj2_csv):
    frame = read_table(fj2_csv)
    assert list(frame.columns) == ["分词文本", "一级标签"]
    assert len(frame) == 7796
    assert set(frame["一级标签"]) == {
        "城乡建设",
        "劳动和社会保障",
        "教育文体",
        "商贸旅游",
        "环境保护",
        "卫生计生",
        "交通运输",
    }
    records = load_records(fj2_csv, ColumnMap(segmented_col="分词文本", targets={"category": "一级标签"}))
    assert records.segmented and len(records) == 7796


_CJK = re.compile(r"[\u4e00-\u9fff]")


def test_rjieba_and_jieba_agree_on_the_real_texts(petitions):
    """The fast backend may replace jieba: on every real message their Chinese words are the same.

    The only differences are in runs of Latin letters, digits and punctuation (rjieba keeps ``2019.4.15`` whole,
    jieba cuts it at the dots), which carry no class signal.
    """
    texts = [normalize(compose(t, x)) for t, x in zip(petitions["留言主题"], petitions["留言详情"])]
    fast, reference = Segmenter("rjieba"), Segmenter("jieba")
    total = matched = docs_with_chinese_difference = 0
    for text in texts:
        a, b = fast.raw_cut(text), reference.raw_cut(text)
        total += len(b)
        blocks = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
        matched += sum(block.size for block in blocks.get_matching_blocks())
        chinese_a = [t for t in a if _CJK.search(t)]
        chinese_b = [t for t in b if _CJK.search(t)]
        docs_with_chinese_difference += chinese_a != chinese_b
    assert matched / total > 0.997, f"token agreement {matched / total:.4%}"  # measured: 99.75%
    # One message of 7,064 has a run of a repeated onomatopoeia (咚咚…) that the two cut at different offsets.
    assert docs_with_chinese_difference <= 2
