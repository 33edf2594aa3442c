"""The batch scoring hot path gives exactly what the plain per-text code gives.

FastTfidf must equal the fitted sklearn union's transform bit for bit, normalize_many must equal normalize text for
text, and the PII patterns (written to start with a literal for speed) must equal their plain forms.
"""

import random
import re
import unicodedata
from functools import partial

import numpy as np
import pytest

from sanshi_ml.config import FeaturesConfig
from sanshi_ml.core.features import FastTfidf, TokenCodes, build_vectorizer, char_ngrams, joined_text_of
from sanshi_ml.core.text import _PII_PATTERNS, Segmenter, nfkc_many, normalize, normalize_many
from sanshi_ml.data.records import model_input

TEXTS = [
    "A3区青青家园小区的电梯坏了一个多月，物业一直不修",
    "楼上邻居每天深夜拖动家具，噪音太大，沟通无果",
    "社區電梯壞了，請儘快維修",
    "我的手机13800001234请回电，邮箱zhang.san+x@example.com.cn",
    "ＡＢＣ１２３，小区　路灯<b>不亮</b>&nbsp;了",
    "车牌湘A12345停在消防通道，座机(010)62345678",
    "",
    "建议周末延长地铁末班车时间",
    "咨询社保转移手续怎么办理",
    "小区停车位被外来车辆占用",
    "e\u0301\u0323 ﬁ ㎡ ①",
    "未分配\u0378码位和\U000e0001标签",
    "Email me: PHONE idnum",
    "  \n\t ",
    "身份证430102199001011234",
] * 3


# Model input strings with titles: a title and a text, a title alone, an empty title, and the hard texts above.
TITLED = [
    model_input(title, text)
    for title, text in zip(
        ["电梯故障", "噪音扰民", "", "咨询社保", "湘A12345占道", "标题里有13800001234", "\x1f只有标题", "請儘快維修"]
        * 3,
        [t for t in TEXTS if t.strip()][:8] + [""] * 8 + TEXTS[:7] + ["正文里有私用区字符\ue000在中间"],
    )
]


def _sklearn_features(model, texts):
    """The model's features from sklearn's own transforms of the plainly cut tokens, the title block included."""
    import scipy.sparse as sp

    X = model.vectorizer.transform(model.tokens(texts))
    if model.title_vectorizer is None:
        return X
    X_title = model.title_vectorizer.transform(model.title_tokens(texts))
    return sp.hstack([X, X_title * np.float32(model.features_config.title_weight)], format="csr")


def _plain_pii() -> dict[str, re.Pattern[str]]:
    """The PII patterns in their plain, slow form: (?<![0-9]) before the first character."""
    month_day = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    return {
        "id_card": re.compile(
            rf"(?<![0-9])(?:[1-9]\d{{5}}(?:18|19|20)\d{{2}}{month_day}\d{{3}}[0-9Xx]"
            rf"|(?:1[1-5]|2[1-3]|3[1-7]|4[1-6]|5[0-4]|6[1-5])\d{{6}}{month_day}\d{{3}})(?![0-9])"
        ),
        "mobile": re.compile(r"(?<![0-9])(?:\+?86[- ]?)?1[3-9]\d(?:(?:[- ]{0,3}\d{4}){2}|\.\d{4}\.\d{4})(?![0-9])"),
        "landline": re.compile(r"(?<![0-9])(?:\(0\d{2,3}\)|0\d{2,3})[- ]?[2-9]\d{6,7}(?:-\d{1,4})?(?![0-9])"),
    }


def test_pii_patterns_equal_their_plain_forms_on_random_digit_strings():
    fast = dict(_PII_PATTERNS)
    rng = random.Random(5)
    alphabet = "0123456789012345678986861+- ()Xx号a..  "
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        for kind, plain in _plain_pii().items():
            assert fast[kind].sub(" P ", text) == plain.sub(" P ", text), (kind, text)


def test_normalize_many_equals_normalize_text_for_text():
    assert normalize_many(TEXTS) == [normalize(text) for text in TEXTS]
    assert normalize_many(TEXTS[:3]) == [normalize(text) for text in TEXTS[:3]]  # the short-batch path
    options = {"to_simplified": False, "pii": False, "lowercase": False}
    assert normalize_many(TEXTS, **options) == [normalize(text, **options) for text in TEXTS]


def test_nfkc_many_equals_unicodedata_over_the_bmp():
    # Every BMP code point except surrogates, in texts of 64, with combining marks after some of them.
    points = [chr(p) for p in range(0x10000) if not 0xD800 <= p <= 0xDFFF]
    texts = ["".join(points[i : i + 64]) + "\u0301" for i in range(0, len(points), 64)]
    assert nfkc_many(texts) == [unicodedata.normalize("NFKC", text) for text in texts]


def test_whitespace_collapse_matches_the_regex_definition():
    spaces = "".join(chr(p) for p in range(0x3100) if chr(p).isspace())
    text = f"{spaces}噪音{spaces}扰民{spaces}"
    assert normalize(text) == re.sub(r"\s+", " ", text).strip() == "噪音 扰民"


def test_filter_verdicts_are_cached_but_not_pickled():
    import pickle

    segmenter = Segmenter()
    tokens = segmenter.raw_cut("小区的电梯坏了，物业不修。")
    first = segmenter.filter(tokens)
    assert segmenter.filter(tokens) == first == [t for t in tokens if segmenter.keeps(t)]
    assert "的" not in first and "，" not in first
    assert pickle.loads(pickle.dumps(segmenter))._verdicts == {}


@pytest.mark.parametrize(
    "config",
    [
        FeaturesConfig(),
        FeaturesConfig(word_ngram_max=3, char_ngram_max=3),
        FeaturesConfig(word_ngram_max=1, char_ngram_max=0),
        FeaturesConfig(min_df=2, max_features=300, sublinear_tf=False),
    ],
)
def test_fast_tfidf_equals_the_fitted_union_bit_for_bit(config):
    segmenter = Segmenter()
    train = segmenter.cut_many(normalize_many(TEXTS[:12]))
    union = build_vectorizer(config).fit(train)
    fast = FastTfidf.from_union(union, keep=segmenter.keeps)
    assert fast is not None
    raw = segmenter.raw_cut_many(normalize_many(TEXTS))
    filtered = [segmenter.filter(tokens) for tokens in raw]
    expected = union.transform(filtered).tocsr()
    joined = segmenter.raw_cut_joined(normalize_many(TEXTS))
    codes = TokenCodes.of(joined)
    text_of = joined_text_of(len(joined), codes.positions(Segmenter.JOIN))
    for got in (
        fast.transform(filtered),
        fast.transform(raw, raw=True),
        fast.transform(filtered),
        fast.transform_codes(codes, text_of, len(TEXTS), raw=True),
    ):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert np.array_equal(got.indptr, expected.indptr)
        assert np.array_equal(got.indices, expected.indices)
        assert np.array_equal(got.data, expected.data)  # exact, not approximately


@pytest.mark.parametrize("backend", ["rjieba", "jieba"])
def test_one_joined_cut_gives_each_texts_own_tokens(backend):
    segmenter = Segmenter(backend)
    texts = normalize_many(TEXTS) + ["", "a.", "-b", "", "x", "物业", ""]
    tokens = segmenter.raw_cut_joined(texts)
    separators = TokenCodes.of(tokens).positions(Segmenter.JOIN).tolist()
    assert separators == [i for i, token in enumerate(tokens) if token == Segmenter.JOIN]
    assert len(separators) == len(texts) - 1
    bounds = [-1, *separators, len(tokens)]
    assert [tokens[a + 1 : b] for a, b in zip(bounds, bounds[1:])] == segmenter.raw_cut_many(texts)
    assert not segmenter.keeps(Segmenter.JOIN)  # the fast path drops the separators as it drops any whitespace
    # A text that holds a newline (never a normalised one) cannot be told apart: the caller cuts one by one.
    assert segmenter.raw_cut_joined(["第一行\n第二行", "别的"]) is None
    assert segmenter.raw_cut_joined([]) is None
    assert segmenter.raw_cut_joined(["只有一条"]) == segmenter.raw_cut("只有一条")


def test_fast_tfidf_declines_what_it_cannot_reproduce():
    union = build_vectorizer(FeaturesConfig()).fit([["物业", "电梯"], ["噪音"]])
    fast = FastTfidf.from_union(union)
    assert fast.transform([["a b", "物业"]]) is None  # a token with a space cannot be keyed: caller falls back
    with pytest.raises(ValueError, match="keep test"):
        fast.transform([["物业"]], raw=True)
    union.set_params(word__norm="l1")
    assert FastTfidf.from_union(union) is None
    union.set_params(word__norm="l2", char__analyzer=partial(char_ngrams, n_max=4))  # too long to key as one int64
    assert FastTfidf.from_union(union) is None


@pytest.mark.parametrize("char_ngram_max", [2, 3])
def test_fast_tfidf_keys_character_ngrams_of_any_code_point(char_ngram_max):
    # Tokens over CJK, ASCII, NUL and astral characters: the integer keys of the character n-grams give sklearn's
    # matrix; with lone surrogates too, the keyed columns are those of char_ngrams looked up in the vocabulary.
    alphabet = ["物", "业", "电", "梯", "a", "1", "\x00", "\U0001f600", "\U00020000", "\U0010ffff"]
    rng = random.Random(char_ngram_max)

    def token(letters) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 5)))

    docs = [[token(alphabet) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    union = build_vectorizer(FeaturesConfig(word_ngram_max=1, char_ngram_max=char_ngram_max)).fit(docs[:200])
    fast = FastTfidf.from_union(union)
    assert fast._char is not None
    expected = union.transform(docs).tocsr()
    got = fast.transform(docs)
    assert np.array_equal(got.indptr, expected.indptr)
    assert np.array_equal(got.indices, expected.indices)
    assert np.array_equal(got.data, expected.data)

    tokens = [token(alphabet + ["\ud800", "\udfff"]) for _ in range(2_000)]
    keyed = fast._char_columns(tokens)
    vocabulary = dict(union.transformer_list)["char"].vocabulary_
    in_python = [[vocabulary[g] for g in char_ngrams((t,), char_ngram_max) if g in vocabulary] for t in tokens]
    assert keyed[0].tolist() == [len(columns) for columns in in_python]
    assert keyed[1].tolist() == [column for columns in in_python for column in columns]


def test_fast_tfidf_token_table_restarts_without_changing_results(monkeypatch):
    union = build_vectorizer(FeaturesConfig()).fit([["物业", "电梯", "坏"], ["噪音", "扰民"]])
    fast = FastTfidf.from_union(union)
    monkeypatch.setattr(FastTfidf, "TOKEN_TABLE_LIMIT", 2)
    docs = [["物业", "电梯"], ["噪音", "扰民", "新词"], [], ["电梯", "坏", "坏"]]
    expected = union.transform(docs).toarray()
    for _ in range(3):
        assert np.array_equal(fast.transform(docs).toarray(), expected)


def test_model_predictions_are_unchanged_by_the_fast_path(demo_model_dir):
    from sanshi_ml.artifacts import load_model

    model = load_model(demo_model_dir).model
    assert model.title_vectorizer is not None  # the demo records have titles
    for texts in ([t for t in TEXTS if t.strip()], TITLED):
        slow = _sklearn_features(model, texts)
        predictions, X = model.predict(texts)
        assert X.shape == slow.shape and (X != slow).nnz == 0
        for name, pred in model.predict_features(slow).items():
            assert np.array_equal(predictions[name].proba, pred.proba)


def test_the_title_block_reads_the_title_alone_and_weighs_it_as_configured(demo_model_dir):
    from sanshi_ml.artifacts import load_model

    model = load_model(demo_model_dir).model
    n_text = len(model.vectorizer.get_feature_names_out())
    title, text = "电梯故障", "小区的电梯坏了一个多月，物业一直不修"
    with_title, without_title, title_only = model.transform(
        [model_input(title, text), model_input(None, text), model_input(title, "")]
    ).toarray()
    assert not without_title[n_text:].any()  # no title, an empty title block
    assert with_title[n_text:].any() and np.array_equal(with_title[n_text:], title_only[n_text:])
    # every part (word, char) of both blocks is L2-normalised, then the title block is scaled by its weight
    ratio = np.linalg.norm(with_title[n_text:]) / np.linalg.norm(with_title[:n_text])
    assert np.isclose(ratio, model.features_config.title_weight, atol=1e-6)


def test_stacked_heads_give_sklearns_probabilities_bit_for_bit_binary_heads_too_float32_weights(repo_params):
    import pandas as pd

    from sanshi_ml.core.model import StackedHeads, TriageModel
    from sanshi_ml.data.records import ColumnMap, to_records
    from tests.conftest import DEMO_CSV

    frame = pd.read_csv(DEMO_CSV, dtype=str)
    frame["公事吗"] = (frame["三事"] == "公事").map({True: "是", False: "否"})
    cmap = ColumnMap(text_cols=("标题", "诉求内容"), targets={"public": "公事吗", "sanshi": "三事"})
    model = TriageModel(repo_params.text, repo_params.features, repo_params.train).fit(
        to_records(frame, cmap, "demo"), progress=lambda _m: None
    )
    X = model.transform(TEXTS[:12])
    float64_weights = {name: head.classifier.predict_proba(X) for name, head in model.heads.items()}
    predictions = model.predict_features(X)
    assert isinstance(model._stacked, StackedHeads) and model.heads["public"].classes == ["否", "是"]
    stacked = model._stacked.predict_proba(X)
    for name, proba in float64_weights.items():
        got = stacked[name]
        # the model's probabilities are the calibrated ones after the head's temperature (train.recalibrate)
        assert np.array_equal(predictions[name].proba, model.heads[name].recalibrated(got))
        # sklearn's own path on the heads, whose weights are now float32 views into the stacked array: bit for bit
        assert np.array_equal(model.heads[name].classifier.predict_proba(X), got)
        # and against the float64 weights they were trained with: the same labels, probabilities within 1e-5
        assert np.array_equal(got.argmax(axis=1), proba.argmax(axis=1))
        assert np.abs(got - proba).max() < 1e-5


def test_model_falls_back_to_sklearn_on_the_tokens_of_the_one_joined_cut(demo_model_dir, monkeypatch):
    from sanshi_ml.artifacts import load_model

    model = load_model(demo_model_dir).model
    model.title_vectorizer = None  # the path of a model without a title block
    texts = [t for t in TEXTS if t.strip()]
    expected = model.vectorizer.transform(model.tokens(texts))
    fast = model._fast_tfidf()
    monkeypatch.setattr(fast, "transform_codes", lambda *a, **k: None)  # as when a kept token holds a space
    monkeypatch.setattr(model.segmenter, "raw_cut_many", lambda _t: pytest.fail("cut a second time"))
    assert (model.transform(texts) != expected).nnz == 0


def test_model_with_a_title_block_falls_back_to_sklearn_with_the_same_features(demo_model_dir, monkeypatch):
    from sanshi_ml.artifacts import load_model

    model = load_model(demo_model_dir).model
    expected = _sklearn_features(model, TITLED)
    with monkeypatch.context() as patch:  # the fast path needs neither sklearn's transform nor a cut per text
        for vectorizer in (model.vectorizer, model.title_vectorizer):
            patch.setattr(vectorizer, "transform", lambda _t: pytest.fail("sklearn's transform"))
        patch.setattr(model.segmenter, "raw_cut_many", lambda _t: pytest.fail("cut per text"))
        assert (model.transform(TITLED) != expected).nnz == 0
    monkeypatch.setattr(model._fast_tfidf("title_vectorizer"), "transform_codes", lambda *a, **k: None)
    assert (model.transform(TITLED) != expected).nnz == 0


def test_texts_the_pii_prefilter_passes_over_have_nothing_to_mask():
    # Random strings made of what the patterns look for (ASCII, full-width and Arabic-Indic digits, separators,
    # letters, province characters, @): every string that mask_pii changes is a candidate.
    from sanshi_ml.core.text import mask_pii, pii_candidates

    rng = random.Random(11)
    alphabet = "0123456789" * 4 + "٣٤٥" + "+-() .·@Xx" + "AaBz" + "湘京粤" + "号码的" + "\u200b\u00ad\ufeff\U000e0020"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(30_000)]
    texts += [
        "13800001234",
        "+86 138 0000 1234",
        "(010)62345678",
        "0731-88880000",
        "430102199001011234",
        "a.b@c.cn",
        "湘A12345",
        "粤B·D12345",
        "138٠٠٠٠١٢٣٤",
        "430102900101123",
        "133.1234.5678",
        "133  1234  5678",
        "138\u200b0000\u200b1234",
        "1\u206038\u00ad00001234",
    ]
    flagged = pii_candidates(texts)
    changed = [mask_pii(text) != text for text in texts]
    assert all(flag for flag, change in zip(flagged, changed) if change)
    assert sum(changed) > 300 and all(flagged[-14:])  # the strings do hold personal data to find
    assert pii_candidates(["小区电梯坏了", "2019年4月15日3栋"] * 10) == [False] * 20
