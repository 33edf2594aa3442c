"""TF-IDF features over segmented text: word n-grams, plus character n-grams inside each word.

The vectorisers take token lists, so a text is segmented once and both feature sets are built from the same tokens.
Character n-grams inside words act like sub-word features: they let 物业公司 share evidence with 物业 and 公司 and
soften segmentation differences between raw and pre-segmented exports. On the official fj2 task they raise macro-F1
from 0.909 to 0.924 (see benchmarks/quality.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion

from sanshi_ml.config import FeaturesConfig

WORD_PREFIX = "word__"


def word_ngrams(tokens: Sequence[str], n_max: int = 2) -> list[str]:
    """Unigrams to ``n_max``-grams of a token list; n-gram parts are joined by a space."""
    grams = list(tokens)
    for n in range(2, n_max + 1):
        grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def char_ngrams(tokens: Sequence[str], n_max: int = 2) -> list[str]:
    """Characters and character n-grams (up to ``n_max``) inside each token, never across tokens."""
    grams: list[str] = []
    for token in tokens:
        grams.extend(token)
        for n in range(2, min(n_max, len(token)) + 1):
            grams.extend(token[i : i + n] for i in range(len(token) - n + 1))
    return grams


def build_vectorizer(cfg: FeaturesConfig) -> FeatureUnion:
    """An unfitted feature union for token lists: ``word`` n-grams and, if enabled, ``char`` n-grams."""
    common = {
        "sublinear_tf": cfg.sublinear_tf,
        "min_df": cfg.min_df,
        "max_features": cfg.max_features,
        "lowercase": False,
        "dtype": np.float32,
    }
    parts = [("word", TfidfVectorizer(analyzer=partial(word_ngrams, n_max=cfg.word_ngram_max), **common))]
    if cfg.char_ngram_max > 0:
        parts.append(("char", TfidfVectorizer(analyzer=partial(char_ngrams, n_max=cfg.char_ngram_max), **common)))
    return FeatureUnion(parts)


def feature_names(vectorizer: FeatureUnion) -> list[str]:
    """Names of the fitted features, prefixed by their part (``word__物业 公司``, ``char__物``)."""
    return list(vectorizer.get_feature_names_out())


# --------------------------------------------------------------------------------------------------------------------
# Fast transform for scoring

_DROPPED, _SPACED = 1, 2


class FastTfidf:
    """The ``transform`` of a fitted :func:`build_vectorizer` union, array at a time, with the same output.

    sklearn's transform runs a Python dict update for every n-gram of every text, which dominates batch scoring.
    Here each token is looked up once in a table of the tokens seen so far (its unigram column, its id for word
    n-grams, its character-n-gram columns and, given the segmenter's ``keep`` test, whether the segmenter's filter
    drops it, so raw segmenter output can be passed without a separate filtering pass); word n-grams are found by
    integer keys in a hash index; the (row, column) pairs are counted with one numpy sort. The counts are then
    weighted with the vectorisers' own ``idf_`` and normalised by sklearn's own ``normalize``, in sklearn's order,
    so the matrix equals ``union.transform`` bit for bit (tests/code/test_fast_paths.py checks it). The model builds
    it lazily and never pickles it.
    """

    TOKEN_TABLE_LIMIT = 300_000  # distinct tokens remembered between batches; the table restarts beyond this

    def __init__(
        self, parts: list[tuple[str, int, TfidfVectorizer]], dtype, keep: Callable[[str], bool] | None = None
    ) -> None:
        self._parts = parts
        self.dtype = dtype
        self._keep = keep
        self.keep_owner: object = None  # the segmenter whose keep test this is (set by the model)
        self._word: dict | None = None
        self._char: tuple[pd.Index, np.ndarray, int] | None = None  # keys of the character n-grams, columns, n_max
        for kind, n_max, vectorizer in parts:
            if kind == "word":
                self._word = self._index_words(vectorizer.vocabulary_, n_max)
            else:
                self._char = (*_index_char_grams(vectorizer.vocabulary_, n_max), n_max)
        self._reset_table()

    @classmethod
    def from_union(cls, union: FeatureUnion, keep: Callable[[str], bool] | None = None) -> FastTfidf | None:
        """A fast transform for ``union``, or None when it is not a union this class reproduces exactly.

        ``keep`` is the segmenter's token test (:meth:`sanshi_ml.core.text.Segmenter.keeps`), for
        ``transform(raw=True)``.
        """
        if not isinstance(union, FeatureUnion) or union.transformer_weights:
            return None
        parts = []
        for _name, vectorizer in union.transformer_list:
            if not isinstance(vectorizer, TfidfVectorizer) or not hasattr(vectorizer, "idf_"):
                return None
            analyzer = vectorizer.analyzer
            if not isinstance(analyzer, partial) or analyzer.args or set(analyzer.keywords) - {"n_max"}:
                return None
            kind = {word_ngrams: "word", char_ngrams: "char"}.get(analyzer.func)
            if kind is None or vectorizer.norm != "l2" or vectorizer.binary or not vectorizer.use_idf:
                return None
            n_max = analyzer.keywords.get("n_max", 2)
            if kind == "char" and n_max > _MAX_KEYED_CHARS:
                return None  # character n-grams too long to key as one int64
            parts.append((kind, n_max, vectorizer))
        kinds = [kind for kind, _, _ in parts]
        if not parts or kinds.count("word") > 1 or kinds.count("char") > 1:
            return None
        if len({vectorizer.dtype for _, _, vectorizer in parts}) != 1:
            return None
        fast = cls(parts, parts[0][2].dtype, keep)
        if "word" in kinds and fast._word is None:
            return None
        return fast

    @staticmethod
    def _index_words(vocabulary: dict[str, int], n_max: int) -> dict | None:
        """Token ids for every part of every word n-gram, and the n-grams (2 and up) as integer keys.

        Built with Arrow's string kernels: a loop in Python over half a million n-grams took over a second of every
        scoring run's start-up.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if not vocabulary:
            return None
        parts = pc.split_pattern(pa.array(list(vocabulary), type=pa.large_string()), " ")
        lengths = pc.list_value_length(parts).to_numpy().astype(np.int64)
        encoded = pc.dictionary_encode(pc.list_flatten(parts))  # ids in order of first appearance
        token_ids = encoded.indices.to_numpy().astype(np.int64)
        tokens = dict(zip(encoded.dictionary.to_pylist(), range(len(encoded.dictionary))))
        all_columns = np.fromiter(vocabulary.values(), dtype=np.int64, count=len(vocabulary))
        starts = np.cumsum(lengths) - lengths
        n_tokens = max(len(tokens), 1)
        longest = int(lengths.max())
        if longest > n_max or n_tokens**longest >= 2**62:
            return None  # tokens with spaces in the vocabulary, or keys too large for int64: use sklearn's path
        unigram = np.full(n_tokens, -1, dtype=np.int64)
        grams = {}
        for length in np.unique(lengths).tolist():
            rows = np.flatnonzero(lengths == length)
            ids_arr = token_ids[starts[rows][:, None] + np.arange(length)]
            cols = all_columns[rows]
            if length == 1:
                unigram[ids_arr[:, 0]] = cols
                continue
            key = np.zeros(len(ids_arr), dtype=np.int64)
            for position in range(length):
                key = key * n_tokens + ids_arr[:, position]
            grams[length] = (pd.Index(key), cols)
        return {"tokens": tokens, "n_tokens": n_tokens, "unigram": unigram, "grams": grams}

    # ------------------------------------------------------------------------------------------------ token table

    def _reset_table(self) -> None:
        self._table: dict[str, int] = {}
        self._word_id = np.empty(1024, dtype=np.int64)  # id in the word n-gram index, -1 if in no word n-gram
        self._flags = np.empty(1024, dtype=np.int8)  # DROPPED: the segmenter's filter drops it; SPACED: has a space
        self._char_start = np.empty(1024, dtype=np.int64)  # this token's character columns in _char_cols
        self._char_len = np.empty(1024, dtype=np.int64)
        self._char_cols = np.empty(4096, dtype=np.int64)
        self._char_used = 0

    def _register(self, tokens: list[str]) -> None:
        """Add new tokens to the table: their word id, their filter and space flags, and their character-feature
        columns."""
        start = len(self._table)
        needed = start + len(tokens)
        if needed > len(self._word_id):
            size = max(needed, 2 * len(self._word_id))
            for name in ("_word_id", "_char_start", "_char_len", "_flags"):
                grown = np.empty(size, dtype=getattr(self, name).dtype)
                grown[:start] = getattr(self, name)[:start]
                setattr(self, name, grown)
        self._table.update(zip(tokens, range(start, needed)))
        word_tokens = self._word["tokens"] if self._word else {}
        self._word_id[start:needed] = np.fromiter(
            map(word_tokens.get, tokens, repeat(-1)), dtype=np.int64, count=len(tokens)
        )
        keep = self._keep
        self._flags[start:needed] = [
            (_DROPPED if keep is not None and not keep(token) else 0) | (_SPACED if " " in token else 0)
            for token in tokens
        ]
        counts, columns = self._char_columns(tokens)
        end = self._char_used + len(columns)
        if end > len(self._char_cols):
            grown = np.empty(max(end, 2 * len(self._char_cols)), dtype=np.int64)
            grown[: self._char_used] = self._char_cols[: self._char_used]
            self._char_cols = grown
        self._char_cols[self._char_used : end] = columns
        self._char_len[start:needed] = counts
        self._char_start[start:needed] = self._char_used + np.cumsum(counts) - counts
        self._char_used = end

    def _char_columns(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per token, how many of its character n-grams are features, and those features' columns, token after
        token. Array at a time on integer keys of the n-grams: a scoring run registers every distinct token it
        meets, so in a real archive, with its names, addresses and numbers, this is a cost per record, not just a
        start-up one."""
        if self._char is None:
            return np.zeros(len(tokens), dtype=np.int64), np.empty(0, dtype=np.int64)
        keys_index, key_columns, n_max = self._char
        owner, keys = _char_gram_keys(tokens, n_max)
        found = keys_index.get_indexer(keys)
        hit = found >= 0
        return np.bincount(owner[hit], minlength=len(tokens)), key_columns[found[hit]]

    def _table_ids(self, distinct: list[str]) -> np.ndarray:
        """Each distinct token's id in the table, new tokens registered first."""
        if len(self._table) > self.TOKEN_TABLE_LIMIT:
            self._reset_table()
        table = self._table
        ids = np.fromiter(map(table.get, distinct, repeat(-1)), dtype=np.int64, count=len(distinct))
        missing = np.flatnonzero(ids < 0)
        if len(missing):
            self._register([distinct[i] for i in missing])
            ids[missing] = [table[distinct[i]] for i in missing]
        return ids

    # ------------------------------------------------------------------------------------------------ transform

    def transform(self, docs: Sequence[Sequence[str]], raw: bool = False) -> sp.csr_matrix | None:
        """TF-IDF matrix of token lists, or None when a kept token holds a space (which this path cannot key).

        ``raw=True``: the lists are the segmenter's raw output, and tokens its filter drops are left out here.
        """
        n_docs = len(docs)
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=n_docs)
        flat = list(chain.from_iterable(docs))
        return self.transform_flat(flat, np.repeat(np.arange(n_docs, dtype=np.int64), lengths), n_docs, raw)

    def transform_flat(
        self, flat: list[str], doc_of: np.ndarray, n_docs: int, raw: bool = False
    ) -> sp.csr_matrix | None:
        """The TF-IDF matrix of tokens ``flat``, token i belonging to text ``doc_of[i]`` (non-decreasing), or None
        as for :meth:`transform`."""
        return self.transform_codes(TokenCodes.of(flat), doc_of, n_docs, raw)

    def transform_codes(
        self, tokens: TokenCodes, doc_of: np.ndarray, n_docs: int, raw: bool = False
    ) -> sp.csr_matrix | None:
        """:meth:`transform_flat` of tokens already encoded."""
        if raw and self._keep is None:
            raise ValueError("raw tokens need the segmenter's keep test (FastTfidf.from_union(..., keep=...))")
        gid = self._table_ids(tokens.distinct)[tokens.codes]
        if raw:
            kept = (self._flags[gid] & _DROPPED) == 0
            gid, doc_of = gid[kept], doc_of[kept]
        if self._word is not None and (self._flags[gid] & _SPACED).any():
            return None
        blocks = []
        for kind, _n_max, vectorizer in self._parts:
            if kind == "word":
                rows, cols = self._word_entries(self._word_id[gid], doc_of)
            else:
                sizes = self._char_len[gid]
                ends = np.cumsum(sizes)
                gather = np.repeat(self._char_start[gid] - (ends - sizes), sizes)
                gather += np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
                cols = self._char_cols[gather]
                rows = np.repeat(doc_of, sizes)
            counts = _count_matrix(rows, cols, n_docs, len(vectorizer.vocabulary_), self.dtype)
            blocks.append(_tfidf_weight(counts, vectorizer))
        return blocks[0] if len(blocks) == 1 else sp.hstack(blocks).tocsr()

    def _word_entries(self, word_id: np.ndarray, doc_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of every word n-gram in the vocabulary, n-grams never crossing a text boundary."""
        index = self._word
        known = word_id >= 0
        unigram = index["unigram"][np.where(known, word_id, 0)]
        hit = known & (unigram >= 0)
        rows, cols = [doc_of[hit]], [unigram[hit]]
        n_tokens = index["n_tokens"]
        for length, (keys, columns) in index["grams"].items():
            span = len(word_id) - length + 1
            if span <= 0:
                continue
            valid = doc_of[:span] == doc_of[length - 1 :]
            key = np.zeros(span, dtype=np.int64)
            for position in range(length):
                valid &= known[position : position + span]
                key = key * n_tokens + word_id[position : position + span]
            where = np.flatnonzero(valid)
            found = keys.get_indexer(key[where])
            match = found >= 0
            rows.append(doc_of[where[match]])
            cols.append(columns[found[match]])
        return np.concatenate(rows), np.concatenate(cols)


# Characters as integers: code point + 1 runs over 1..0x110000, so an n-gram's key is its characters' digits in base
# 0x110001, and keys of up to three characters fit in an int64.
_CHAR_BASE = 0x110001
_MAX_KEYED_CHARS = 3


def _code_points(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points (+1) of all ``strings`` one after another, and each string's length."""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    # UTF-32 gives one unit per code point; surrogatepass lets a lone surrogate (possible in JSON input) through
    points = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return points.astype(np.int64) + 1, lengths


def _char_gram_keys(tokens: list[str], n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Every character n-gram (1 to ``n_max`` ≤ 3 characters) inside each token, as (token number, key) in
    :func:`char_ngrams`' order, token after token."""
    points, lengths = _code_points(tokens)
    owner = np.repeat(np.arange(len(tokens), dtype=np.int64), lengths)
    to_end = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(points))  # characters left in the token
    owners, keys = [], []
    for n in range(1, n_max + 1):
        starts = np.flatnonzero(to_end >= n)
        key = points[starts]
        for offset in range(1, n):
            key = key * _CHAR_BASE + points[starts + offset]
        owners.append(owner[starts])
        keys.append(key)
    owner, key = np.concatenate(owners), np.concatenate(keys)
    order = np.argsort(owner, kind="stable")
    return owner[order], key[order]


def _index_char_grams(vocabulary: dict[str, int], n_max: int) -> tuple[pd.Index, np.ndarray]:
    """The character vocabulary (n-grams of at most ``n_max`` ≤ 3 characters) as integer keys (see
    :func:`_char_gram_keys`) and their columns."""
    points, lengths = _code_points(list(vocabulary))
    starts = np.cumsum(lengths) - lengths
    keys = np.zeros(len(lengths), dtype=np.int64)
    for offset in range(n_max):
        longer = lengths > offset
        keys[longer] = keys[longer] * _CHAR_BASE + points[starts[longer] + offset]
    columns = np.fromiter(vocabulary.values(), dtype=np.int64, count=len(vocabulary))
    return pd.Index(keys), columns


@dataclass
class TokenCodes:
    """A batch of tokens dictionary-encoded once, by Arrow in C++: its distinct tokens and each token's code.

    A batch of 10,000 texts has ~2 million tokens but ~50,000 distinct ones, so the fast transform asks its Python
    dict once per distinct token, and separators are found by comparing integer codes, not strings.
    """

    distinct: list[str]
    codes: np.ndarray

    @classmethod
    def of(cls, tokens: list[str]) -> TokenCodes:
        import pyarrow as pa
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(pa.array(tokens, type=pa.large_string()))
        return cls(encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False))

    def positions(self, token: str) -> np.ndarray:
        """Where ``token`` occurs, in order."""
        try:
            code = self.distinct.index(token)
        except ValueError:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(self.codes == code)

    def subset(self, positions: np.ndarray) -> TokenCodes:
        """The tokens at ``positions``, encoded by their own distinct tokens."""
        used, codes = np.unique(self.codes[positions], return_inverse=True)
        return TokenCodes([self.distinct[i] for i in used.tolist()], codes)


def joined_text_of(n_tokens: int, separators: Sequence[int]) -> np.ndarray:
    """For tokens of texts cut in one call, each token's text number (a separator belongs to the text it starts)."""
    starts = np.zeros(n_tokens, dtype=np.int64)
    starts[np.asarray(separators, dtype=np.int64)] = 1
    return np.cumsum(starts)


def _count_matrix(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int, dtype) -> sp.csr_matrix:
    """Counts of (row, column) pairs as a CSR matrix with sorted indices, as CountVectorizer leaves them."""
    key = rows * n_cols + cols
    key.sort()
    if len(key):
        first = np.empty(len(key), dtype=bool)
        first[0] = True
        np.not_equal(key[1:], key[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, len(key))).astype(dtype)
        key = key[starts]
    else:
        counts = np.empty(0, dtype=dtype)
    row = key // n_cols
    indptr = np.searchsorted(row, np.arange(n_rows + 1), side="left")
    index_dtype = np.int32 if max(len(key), n_cols) < 2**31 else np.int64
    return sp.csr_matrix(
        ((counts), (key - row * n_cols).astype(index_dtype), indptr.astype(index_dtype)), shape=(n_rows, n_cols)
    )


def _tfidf_weight(counts: sp.csr_matrix, vectorizer: TfidfVectorizer) -> sp.csr_matrix:
    """TfidfTransformer.transform's steps, in its order: log-scaled tf, idf, row-wise L2 norm."""
    from sklearn.preprocessing import normalize

    if vectorizer.sublinear_tf:
        np.log(counts.data, counts.data)
        counts.data += 1.0
    counts.data *= vectorizer.idf_[counts.indices]
    return normalize(counts, norm="l2", copy=False)
