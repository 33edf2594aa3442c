"""Typed parameters: one section per stage, unknown keys rejected by name."""

import pytest

from sanshi_ml.config import ConfigError, Params, load_params, parse_params, with_overrides
from tests.conftest import REPO


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.train.target_accuracy == 0.95
    assert params.data.columns.targets["sanshi"] == "三事"


def test_unknown_or_misspelled_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  CC: 1.0\nevaluate:\n  out_dri: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert "unknown key 'train.CC'" in str(error.value)
    assert "unknown key 'evaluate.out_dri'" in str(error.value)


def test_unknown_section_and_bad_value():
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        parse_params({"trian": {}})
    with pytest.raises(ConfigError, match="train.target_accuracy"):
        parse_params({"train": {"target_accuracy": 1.5}})


def test_overrides_apply_dotted_keys_and_validate():
    params = with_overrides(Params(), {"train.C": 0.3, "split.seed": 7, "text.backend": None})
    assert params.train.C == 0.3 and params.split.seed == 7 and params.text.backend == "rjieba"
    with pytest.raises(ConfigError, match="text.backend"):
        with_overrides(Params(), {"text.backend": "hanlp"})


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "none.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(path)


def test_a_target_cannot_be_linked_to_itself_and_the_classifier_is_one_of_three():
    import pytest

    from sanshi_ml.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="linked to itself"):
        parse_params({"train": {"linked_targets": [["unit", "unit"]]}})
    with pytest.raises(ConfigError, match="classifier"):
        parse_params({"train": {"classifier": "random_forest"}})
    assert parse_params({"train": {"classifier": "logistic_regression"}}).train.classifier == "logistic_regression"


def test_prior_correction_strengths_are_checked():
    import pytest

    from sanshi_ml.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="prior_correction"):
        parse_params({"train": {"prior_correction": []}})
    with pytest.raises(ConfigError, match="prior_correction"):
        parse_params({"train": {"prior_correction": [0, 5]}})
    with pytest.raises(ConfigError, match="prior_correction_by_target.sanshi"):
        parse_params({"train": {"prior_correction_by_target": {"sanshi": []}}})
