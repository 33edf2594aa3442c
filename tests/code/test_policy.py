"""The 三事分流责任清单: loading, aliases, unit mapping and contradictions."""

import pytest

from sanshi_ml.core.policy import PolicyError, load_policy


def test_default_list_covers_the_three_classes():
    policy = load_policy()
    assert set(policy.classes) == {"公事", "共事", "家事"}
    assert {c.colour for c in policy.classes.values()} == {"red", "orange", "yellow"}
    for cls in policy.classes.values():
        assert cls.handling_mode and cls.time_limit_days > 0 and len(cls.matters) == 8
    assert policy.class_info("大事").name == "公事"
    assert policy.class_info("私事").name == "家事"
    assert policy.class_info("unknown") is None


def test_units_map_to_their_default_class():
    policy = load_policy()
    assert policy.expected_class("社区居委会/村委会") == "共事"
    assert policy.expected_class("网格/人民调解") == "家事"
    assert policy.expected_class("住房和城乡建设局") == "公事"
    assert policy.expected_class("一个清单里没有的单位") is None


def test_contradictions_between_class_and_unit():
    policy = load_policy()
    assert policy.contradicts("公事", "网格/人民调解")
    assert policy.contradicts("家事", "城市管理和综合执法局")
    assert not policy.contradicts("共事", "社区居委会/村委会")
    assert not policy.contradicts("小事", "社区居委会/村委会")  # alias of 共事
    assert not policy.contradicts("公事", "未列出的单位")
    assert policy.contradictions(["公事", "共事"], ["网格/人民调解", "社区居委会/村委会"]).tolist() == [True, False]


def _write(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    return path


CLASS = """    colour: red
    colour_hex: "#d93025"
    handled_by: 部门
    handling_mode: 挂单销号
    time_limit_days: 5
"""


def test_a_local_list_is_configuration(tmp_path):
    path = _write(tmp_path, f"name: 本地清单\nversion: '1'\nclasses:\n  公事:\n{CLASS}units:\n  交警: 公事\n")
    policy = load_policy(path)
    assert policy.name == "本地清单" and policy.expected_class("交警") == "公事"
    assert len(policy.sha256) == 64


@pytest.mark.parametrize(
    "body, message",
    [
        (
            f"name: x\nversion: '1'\nclasses:\n  公事:\n{CLASS}units:\n  交警: 大家事\n",
            "unknown 三事 classes: 交警 -> 大家事",
        ),
        (f"name: x\nversion: '1'\nclasses:\n  公事:\n{CLASS}    colr: blue\n", "classes.公事.colr"),
        ("name: x\nversion: '1'\nclasses:\n  公事:\n    colour: red\n", "classes.公事.colour_hex"),
        ("name: [unclosed\n", "not valid UTF-8 YAML"),
    ],
)
def test_broken_lists_name_the_file_and_the_key(tmp_path, body, message):
    with pytest.raises(PolicyError, match=message) as error:
        load_policy(_write(tmp_path, body))
    assert "list.yaml" in str(error.value)


def test_missing_list_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "none.yaml")
