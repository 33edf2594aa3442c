"""Normalisation, personal-data masking and segmentation."""

import pickle

import pytest

from sanshi_ml.core.text import (
    TITLE_MARK,
    Segmenter,
    mark_titles,
    mask_pii,
    normalize,
    normalize_many,
    split_segmented,
    strip_html,
)
from sanshi_ml.data.records import TITLE_END, compose, model_input, split_title


def test_nfkc_folds_full_width_forms():
    assert normalize("ＡＢＣ１２３，小区") == "abc123,小区"


def test_traditional_characters_become_simplified():
    assert normalize("社區電梯壞了，請儘快維修") == "社区电梯坏了,请尽快维修"


def test_html_and_entities_are_removed_but_a_lone_angle_bracket_survives():
    assert normalize("<p>路灯<b>不亮</b>&nbsp;了</p><!-- x -->") == "路灯 不亮 了"
    assert strip_html("温度<5度时结冰") == "温度<5度时结冰"


def test_whitespace_collapses_to_single_spaces():
    assert normalize("  噪音\t\t扰民\n\n\u3000严重 ") == "噪音 扰民 严重"


@pytest.mark.parametrize(
    "raw, placeholder",
    [
        ("我的手机13800001234请回电", "PHONE"),
        ("电话139-0000-5678", "PHONE"),
        ("电话+86 138 0000 1234", "PHONE"),
        ("座机0731-88880000", "PHONE"),
        ("座机(010)62345678", "PHONE"),
        ("身份证430102199001011234", "IDNUM"),
        ("身份证43010219900101123X", "IDNUM"),
        ("邮箱zhang.san+x@example.com.cn", "EMAIL"),
        ("车牌湘A12345停在消防通道", "PLATE"),
        ("新能源车牌粤B·D12345", "PLATE"),
    ],
)
def test_personal_data_is_replaced_by_placeholders(raw, placeholder):
    masked = normalize(raw)
    assert placeholder in masked
    assert not any(ch.isdigit() for ch in masked.replace("86", "")), masked


def test_masking_leaves_dates_amounts_and_addresses_alone():
    text = "2019年4月15日反映的3栋2单元,欠薪12000元,编号20190415"
    assert mask_pii(text) == text


def test_id_number_is_not_half_masked_as_a_phone():
    assert normalize("430102199001011234") == "IDNUM"


def test_compose_joins_title_and_text():
    assert compose("标题", "内容") == "标题\n内容"
    assert compose(None, "内容") == "内容"
    assert compose("标题", "") == "标题"


def test_model_input_marks_the_title_and_split_title_recovers_it():
    assert split_title(model_input(" 标题 ", "内容\n第二行")) == ("标题", "内容\n第二行")
    assert model_input(None, "内容") == "内容" and split_title("内容") == ("", "内容")
    assert split_title(model_input("标题", "")) == ("标题", "")
    # a separator inside a cell cannot move the boundary
    assert split_title(model_input(f"a{TITLE_END}b", f"c{TITLE_END}d")) == ("a b", "c d")
    # normalising the whole string reads the boundary as a space, as the newline that compose puts there
    assert normalize(model_input("标题", "内容")) == normalize(compose("标题", "内容")) == "标题 内容"


def test_mark_titles_spells_the_title_end_as_a_token_and_leaves_no_stray_mark():
    marked = mark_titles([model_input("标题", "正文"), model_input(None, f"正文{TITLE_MARK}里"), "只有正文"])
    assert marked == [f"标题 {TITLE_MARK} 正文", "正文 里", "只有正文"]
    assert Segmenter().raw_cut(normalize(marked[0])) == ["标题", " ", TITLE_MARK, " ", "正文"]
    assert Segmenter().filter([TITLE_MARK]) == []


@pytest.fixture(scope="module", params=["rjieba", "jieba"])
def segmenter(request):
    return Segmenter(request.param)


def test_segmenter_drops_punctuation_and_stop_words(segmenter):
    tokens = segmenter.cut(normalize("尊敬的领导：您好！我们小区的电梯坏了。"))
    assert "电梯" in tokens
    assert not {"的", "：", "!", "您好", "。"} & set(tokens)


def test_user_dictionary_keeps_compound_names_whole(segmenter):
    tokens = segmenter.cut(normalize("社区居委会和业委会让网格员来调解"))
    assert {"社区居委会", "业委会", "网格员"} <= set(tokens)
    bare = Segmenter(segmenter.backend, user_dict=None)
    assert "网格员" not in bare.cut(normalize("社区居委会和业委会让网格员来调解"))


def test_placeholders_survive_segmentation_as_one_token(segmenter):
    tokens = segmenter.cut(normalize("请回电13800001234或发邮件到a@b.com"))
    assert tokens.count("PHONE") == 1 and tokens.count("EMAIL") == 1


def test_segmenter_pickles_without_its_dictionary(segmenter):
    segmenter.cut("预热")
    blob = pickle.dumps(segmenter)
    assert len(blob) < 10_000
    assert pickle.loads(blob).cut("小区电梯坏了") == segmenter.cut("小区电梯坏了")


def test_keep_only_drops_words_the_training_data_never_had():
    segmenter = Segmenter(keep_only={"电梯", "小区"})
    assert segmenter.cut("小区的电梯和路灯坏了") == ["小区", "电梯"]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown segmentation backend 'hanlp'"):
        Segmenter("hanlp")


@pytest.mark.parametrize("backend", ["rjieba", "jieba"])
def test_a_segmenter_carries_its_word_lists_in_its_pickle(tmp_path, backend):
    # A model trained with local word lists cuts text the same way on a machine without those files (or where they
    # were edited since): a Dask worker, the server, another analyst's checkout.
    user_dict = tmp_path / "userdict.txt"
    user_dict.write_text("青青家园小区 100000 ns\n", encoding="utf-8")
    stopwords = tmp_path / "stopwords.txt"
    stopwords.write_text("物业\n", encoding="utf-8")
    segmenter = Segmenter(backend, user_dict=str(user_dict), stopwords=str(stopwords))
    text = "青青家园小区的物业不修电梯"
    cut = segmenter.cut(text)
    assert "青青家园小区" in cut and "物业" not in cut
    blob = pickle.dumps(segmenter)
    user_dict.unlink()
    stopwords.write_text("电梯\n", encoding="utf-8")  # edited after training: the model keeps what it trained with
    moved = pickle.loads(blob)
    assert moved.cut(text) == cut
    # A missing list fails when the segmenter is made (at training), naming the file, not at the first text scored.
    with pytest.raises(FileNotFoundError, match="userdict.txt"):
        Segmenter(backend, user_dict=str(user_dict))


def test_pre_segmented_text_is_split_on_spaces_only():
    assert split_segmented("市 西湖 建筑 集团 占 道 施工  ,") == ["市", "西湖", "建筑", "集团", "占", "道", "施工"]


def test_a_lone_surrogate_becomes_a_replacement_character_not_an_error():
    # JSON input can carry "\ud800"; it is never valid text, and must not crash training or scoring.
    assert normalize("电梯\ud800坏了") == "电梯\ufffd坏了"
    # Whether or not 繁→简 runs (it used to be the step that replaced them), and in batches too.
    assert normalize("电梯\ud800坏了", to_simplified=False) == "电梯\ufffd坏了"
    texts = ["楼道\udfff灯不亮"] + ["小区噪音扰民"] * 20
    assert normalize_many(texts, to_simplified=False) == [normalize(t, to_simplified=False) for t in texts]
    assert "楼道" in Segmenter().cut_many(normalize_many(texts, to_simplified=False))[0]  # the segmenter takes it


# ------------------------------------------------------------------------------------------- skipping OpenCC's t2s


def test_texts_without_a_trigger_are_left_to_themselves_and_the_rest_converted():
    from sanshi_ml.core.text import _t2s, _to_simplified, needs_simplifying

    assert not needs_simplifying("小区电梯停了一个多月,物业一直不修")  # simplified already: no conversion
    for text in ("社區電梯壞了", "他沈迷游戏", "答覆如下", "打坏了", "乾隆", "\U00020bb7野家"):
        assert _to_simplified(text) == _t2s().convert(text), text
    assert needs_simplifying("沈迷") and needs_simplifying("批覆") and needs_simplifying("電梯")


def test_the_trigger_list_matches_the_installed_opencc_dictionaries():
    import subprocess
    import sys
    from pathlib import Path

    import opencc

    if not (Path(opencc.__file__).parent / "clib" / "bin" / "opencc_dict").exists():
        pytest.skip("this OpenCC build ships no opencc_dict tool to dump its dictionaries")
    from sanshi_ml.core.text import _t2s_triggers

    if _t2s_triggers() is None:  # another OpenCC release: every text is converted, correct but without the shortcut
        pytest.skip("the trigger list was made for another OpenCC version; run scripts/opencc_triggers.py")
    script = Path(__file__).resolve().parents[2] / "scripts" / "opencc_triggers.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_skipping_the_conversion_never_changes_a_result():
    # Random texts over every trigger character, the characters of phrases that t2s changes only in context
    # (沈 覆 坏 瞭 藉 …) and common simplified ones: the shortcut and the plain conversion agree on each.
    import random

    from sanshi_ml.core.text import _builtin_path, _t2s, _to_simplified

    lines = _builtin_path("opencc_t2s_triggers.txt").read_text(encoding="utf-8").splitlines()
    triggers = "".join(line for line in lines if not line.startswith("#"))
    context = "沈迷覆盖答批坏打拉子瞭解明藉口以免著作乾隆强沒有內容的一是了小区物业电梯"
    rng = random.Random(7)
    converter = _t2s()
    for _ in range(20_000):
        pool = context if rng.random() < 0.8 else context + triggers
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
        assert _to_simplified(text) == converter.convert(text), text


def test_another_opencc_version_converts_every_text(monkeypatch):
    import importlib.metadata

    from sanshi_ml.core import text as text_module

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "opencc" else real_version(name))
    text_module._t2s_triggers.cache_clear()
    try:
        assert text_module._t2s_triggers() is None
        assert text_module.needs_simplifying("小区电梯坏了")
    finally:
        monkeypatch.undo()
        text_module._t2s_triggers.cache_clear()
