"""Text normalisation, personal-data masking and word segmentation.

Every text goes through :func:`normalize` before anything is learned, logged or stored, so personal data never
reaches a model, a log line or the feedback database. Segmentation uses rjieba (the Rust build of jieba) by default;
the pure-Python jieba is selectable and produces the same tokens.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from sanshi_ml import resource
from sanshi_ml.data.records import TITLE_END

log = logging.getLogger(__name__)

BUILTIN = "builtin"

# Placeholders are plain ASCII words so that both segmenters keep each one as a single token.
PII_PLACEHOLDERS = {
    "email": "EMAIL",
    "id_card": "IDNUM",
    "mobile": "PHONE",
    "landline": "PHONE",
    "plate": "PLATE",
}

# Order matters: e-mail first (its local part may hold digits), then ID numbers (18 digits, or the legacy 15) before
# the 11-digit mobiles they contain, then landlines, then licence plates.
# Every pattern starts with a literal or a character class, so re jumps straight to candidate positions instead of
# trying the pattern at every character. "Not preceded by a digit" is therefore written after the first character:
# X(?<![0-9].) is (?<![0-9])X. A mobile is (?<![0-9])(?:\+?86[- ]?)?1[3-9]…, spelled as one branch per first
# character; a landline likewise ("(0…)" or "0…"). tests/code/test_fast_paths.py checks them against the plain forms.
# A mobile's groups of 3-4-4 digits may be written together, apart (hyphens or up to three spaces: "133 1234 5678",
# "133 - 1234 - 5678") or with a dot at both places ("133.1234.5678"); a dot at one place only is a decimal number.
_MOBILE_TAIL = r"[3-9]\d(?:(?:[- ]{0,3}\d{4}){2}|\.\d{4}\.\d{4})(?![0-9])"
_LANDLINE_TAIL = r"[- ]?[2-9]\d{6,7}(?:-\d{1,4})?(?![0-9])"
_MONTH_DAY = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
# The legacy 15-digit 身份证 number (still valid for people who never renewed a first-generation card): area code,
# birth date as YYMMDD, sequence, no check digit. Its first two digits must name a province (11-65), which with the
# date leaves about 1 in 70 other 15-digit numbers (old business-registration or tax numbers) to be masked too.
_PROVINCE_SECOND_DIGIT = r"(?:(?<=1)[1-5]|(?<=2)[1-3]|(?<=3)[1-7]|(?<=4)[1-6]|(?<=5)[0-4]|(?<=6)[1-5])"
_PII_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")),
    (
        "id_card",
        re.compile(
            rf"[1-9](?<![0-9].)(?:\d{{5}}(?:18|19|20)\d{{2}}{_MONTH_DAY}\d{{3}}[0-9Xx]"
            rf"|{_PROVINCE_SECOND_DIGIT}\d{{6}}{_MONTH_DAY}\d{{3}})(?![0-9])"
        ),
    ),
    (
        "mobile",
        re.compile(
            rf"\+(?<![0-9].)86[- ]?1{_MOBILE_TAIL}|8(?<![0-9].)6[- ]?1{_MOBILE_TAIL}|1(?<![0-9].){_MOBILE_TAIL}"
        ),
    ),
    ("landline", re.compile(rf"\((?<![0-9].)0\d{{2,3}}\){_LANDLINE_TAIL}|0(?<![0-9].)\d{{2,3}}{_LANDLINE_TAIL}")),
    (
        "plate",
        re.compile(
            r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-Za-z][·.]?[A-Za-z0-9]{5,6}(?![A-Za-z0-9])"
        ),
    ),
]

# Characters that show as nothing (Unicode's Default_Ignorable_Code_Point: soft hyphen, zero-width space, non-joiner
# and joiner, word joiner, byte-order mark, bidirectional marks, variation selectors, Hangul fillers …). Inside a
# number a reader sees the number whole while the patterns see two halves, so mask_pii first removes every run of
# them that touches a character personal data is written with (a digit, an ASCII letter, @ . + - _ % ( ) ·);
# elsewhere, between Chinese characters or inside an emoji sequence, they are left alone.
_INVISIBLE_CHARS = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff"
)
_INVISIBLE = re.compile(f"[{_INVISIBLE_CHARS}]")
_PII_NEIGHBOUR = r"[\dA-Za-z@.+\-_%()·]"
_INVISIBLE_IN_PII = re.compile(f"(?<={_PII_NEIGHBOUR})[{_INVISIBLE_CHARS}]+|[{_INVISIBLE_CHARS}]+(?={_PII_NEIGHBOUR})")


def _re2_class(chars: str) -> str:
    """A Python character-class body of literal characters and ranges, in RE2's \\x{…} syntax."""
    return "".join(f"\\x{{{ord(ch):x}}}" if ch != "-" else "-" for ch in chars)


# A necessary condition of each pattern above, without its look-arounds and in RE2's syntax (\p{Nd} is what Python's
# \d matches), so that Arrow can test a whole batch in C++. Every match of a pattern contains a match of its loose
# form here, and every text holding an invisible character is a candidate, so in a text with no loose match no
# pattern matches, nothing is removed, none of mask_pii's substitutions happens, and the text comes out unchanged.
# tests/code/test_fast_paths.py checks it on random strings.
_PII_CANDIDATE = "|".join(
    [
        "@",
        r"[1-9]\p{Nd}{5}(?:18|19|20)\p{Nd}{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\p{Nd}|3[01])\p{Nd}{3}[0-9Xx]",
        r"[1-6]\p{Nd}{7}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\p{Nd}|3[01])\p{Nd}{3}",
        r"1[3-9]\p{Nd}(?:[-. ]{0,3}\p{Nd}{4}){2}",
        r"0\p{Nd}{2,3}\)?[- ]?[2-9]\p{Nd}{6}",
        r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-Za-z][·.]?[A-Za-z0-9]{5}",
        f"[{_re2_class(_INVISIBLE_CHARS)}]",
    ]
)

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Only things shaped like tags are removed, so a stray "<" in a resident's text survives.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_NON_WORD_TOKEN = re.compile(r"[\W_]+")


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def mask_pii(text: str) -> str:
    """Replace phone numbers, 身份证 numbers (18 or 15 digits), e-mail addresses and licence plates by placeholder
    words; invisible characters written into them are removed first (see ``_INVISIBLE_CHARS``)."""
    if _INVISIBLE.search(text) is not None:
        text = _INVISIBLE_IN_PII.sub("", text)
    for kind, pattern in _PII_PATTERNS:
        if kind == "email" and "@" not in text:  # the cheapest test there is; most texts have no e-mail address
            continue
        text = pattern.sub(f" {PII_PLACEHOLDERS[kind]} ", text)
    return text


def strip_html(text: str) -> str:
    """Remove HTML comments and tags and decode entities such as ``&nbsp;``."""
    if "<" in text:
        text = _HTML_TAG.sub(" ", _HTML_COMMENT.sub(" ", text))
    if "&" in text:
        text = html.unescape(text)
    return text


_ARROW_MIN_BATCH = 16  # smaller batches take the per-text Python paths: Arrow's cost per call would outweigh it


def normalize(text: str, *, to_simplified: bool = True, pii: bool = True, lowercase: bool = True) -> str:
    """NFKC, HTML removed, 繁→简, personal data masked, whitespace collapsed to single spaces."""
    if not text:
        return ""
    # One text takes normalize_many's per-text paths (Python's NFKC, every personal-data pattern), so the order of
    # the steps is written once.
    return normalize_many([text], to_simplified=to_simplified, pii=pii, lowercase=lowercase)[0]


def normalize_many(
    texts: Sequence[str], *, to_simplified: bool = True, pii: bool = True, lowercase: bool = True
) -> list[str]:
    """:func:`normalize` for a batch, text for text the same result, with NFKC and the search for personal data
    done array at a time."""
    texts = [strip_html(text) for text in nfkc_many(texts)]
    if to_simplified:
        texts = [_to_simplified(text) for text in texts]
    if pii:
        texts = [mask_pii(text) if candidate else text for text, candidate in zip(texts, pii_candidates(texts))]
    return [_finish(text, lowercase) for text in texts]


def pii_candidates(texts: Sequence[str]) -> list[bool]:
    """Per text, whether :func:`mask_pii` could change it (False: it would return the text unchanged).

    One RE2 search over the whole batch in Arrow instead of four Python regex passes per text; under 0.2% of real
    hotline texts hold anything that looks like personal data. Short batches, and batches Arrow cannot take (lone
    surrogates), are all candidates.
    """
    if len(texts) < _ARROW_MIN_BATCH:
        return [True] * len(texts)
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        array = pa.array(texts, type=pa.large_string())
    except (UnicodeEncodeError, pa.ArrowException):
        return [True] * len(texts)
    return pc.match_substring_regex(array, _PII_CANDIDATE).to_pylist()


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@lru_cache(maxsize=1)
def _t2s_triggers() -> tuple[re.Pattern[str], re.Pattern[str]] | None:
    """Patterns (BMP, astral) of the characters without which OpenCC's t2s leaves a text unchanged, or None when
    the list was made from another OpenCC version than the one installed (then every text is converted).

    The list (resources/opencc_t2s_triggers.txt) is derived from OpenCC's own dictionaries by
    scripts/opencc_triggers.py; 92% of real hotline texts hold none of its characters, and searching for them
    costs about a quarter of converting. Split in two because re matches a BMP-only class with a bitmap.
    """
    import importlib.metadata

    lines = _builtin_path("opencc_t2s_triggers.txt").read_text(encoding="utf-8").splitlines()
    made_with = lines[0].split()[2] if lines and lines[0].startswith("# opencc ") else None
    try:
        installed = importlib.metadata.version("opencc")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if made_with is None or made_with != installed:
        log.info("OpenCC %s installed, trigger list made with %s: converting every text", installed, made_with)
        return None
    chars = "".join(line for line in lines if not line.startswith("#"))
    bmp = "".join(re.escape(ch) for ch in chars if ord(ch) <= 0xFFFF)
    astral = "".join(re.escape(ch) for ch in chars if ord(ch) > 0xFFFF)
    return re.compile(f"[{bmp}]"), re.compile(f"[{astral}]" if astral else "(?!)")


def needs_simplifying(text: str) -> bool:
    """Whether OpenCC's t2s could change ``text`` (False: it would return it unchanged)."""
    triggers = _t2s_triggers()
    return triggers is None or _holds_any(triggers, text)


def _to_simplified(text: str) -> str:
    """OpenCC t2s, for a text without lone surrogates (:func:`nfkc_many` replaced them)."""
    return _t2s().convert(text) if needs_simplifying(text) else text


def _finish(text: str, lowercase: bool) -> str:
    """Lower case (placeholders excepted) and whitespace collapsed: normalisation's last steps."""
    if lowercase:
        text = text.lower()
        # Placeholders stay upper case so they are recognisable and never collide with real words.
        for placeholder in _PLACEHOLDER_WORDS:
            text = text.replace(placeholder.lower(), placeholder)
    # str.split() splits on exactly the characters re's \s matches, so this equals sub(r"\s+", " ").strip().
    return " ".join(text.split())


_PLACEHOLDER_WORDS = tuple(sorted(set(PII_PLACEHOLDERS.values())))


@lru_cache(maxsize=1)
def _unassigned_chars() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Code points this Python's Unicode database does not know (and surrogates), the only ones where pyarrow's
    newer Unicode tables may decompose differently: (a pattern for the BMP, a pattern for the rest). Split in two
    because re matches a BMP-only class with a bitmap but a class with astral ranges range by range."""
    classes: list[list[str]] = [[], []]
    start = None
    for point in range(0x110001):
        unknown = point < 0x110000 and unicodedata.category(chr(point)) in ("Cn", "Cs")
        if unknown and start is None:
            start = point
        elif not unknown and start is not None:
            classes[start > 0xFFFF].append(f"\\U{start:08x}-\\U{point - 1:08x}")
            start = None
    return re.compile("[" + "".join(classes[0]) + "]"), re.compile("[" + "".join(classes[1]) + "]")


_ASTRAL = re.compile("[\\U00010000-\\U0010ffff]")


def _holds_any(classes: tuple[re.Pattern[str], re.Pattern[str]], text: str) -> bool:
    """Whether ``text`` holds a character of a class split into (BMP pattern, astral pattern); the astral one is
    searched only when the text has astral characters at all."""
    bmp, astral = classes
    return bmp.search(text) is not None or (_ASTRAL.search(text) is not None and astral.search(text) is not None)


def build_unassigned_table() -> None:
    """Build now the table of code points Python does not know, which only batches of ``_ARROW_MIN_BATCH`` texts
    or more use and would otherwise build at the first (0.3 s): a process about to fork its workers calls this, so
    they share one copy instead of each building its own."""
    _unassigned_chars()


def _has_unassigned(text: str) -> bool:
    return _holds_any(_unassigned_chars(), text)


def _python_nfkc(text: str) -> str:
    """Python's NFKC, lone surrogates first replaced by U+FFFD (from JSON escapes, or undecodable bytes in a command
    line): they are never valid text, and neither OpenCC, nor the segmenters, nor Arrow can take them."""
    return unicodedata.normalize("NFKC", _LONE_SURROGATE.sub("\ufffd", text))


def nfkc_many(texts: Sequence[str]) -> list[str]:
    """``unicodedata.normalize("NFKC", t)`` for each text, lone surrogates replaced by U+FFFD, about five times
    faster on a batch.

    NFKC is NFC of NFKD. Python's NFKD walks code points one by one; pyarrow's (utf8proc) runs in C++ over the
    whole array, and Python's NFC then returns at once for the usual text that has nothing to compose. For code
    points assigned in both Unicode versions, decompositions and combining classes are stable by Unicode policy,
    so the result is the same; texts with code points this Python does not know, surrogates among them, take
    Python's path, so the batch's one search for them also finds the lone surrogates.
    """
    texts = list(texts)
    if len(texts) < _ARROW_MIN_BATCH:
        return [_python_nfkc(text) for text in texts]
    import pyarrow as pa
    import pyarrow.compute as pc

    slow = [i for i, text in enumerate(texts) if _has_unassigned(text)] if _has_unassigned("".join(texts)) else []
    if slow:
        fast_rows = sorted(set(range(len(texts))) - set(slow))
        out = list(texts)
        for i in slow:
            out[i] = _python_nfkc(texts[i])
        for i, text in zip(fast_rows, nfkc_many([texts[i] for i in fast_rows])):
            out[i] = text
        return out
    decomposed = pc.utf8_normalize(pa.array(texts, type=pa.large_string()), form="NFKD").to_pylist()
    return [unicodedata.normalize("NFC", text) for text in decomposed]


# The title's end as a token of its own: a private-use character, which normalisation leaves as it is, both
# segmenters cut off on its own between the spaces around it, and the filter drops as a non-word token.
TITLE_MARK = "\ue000"


def mark_titles(texts: Sequence[str]) -> list[str]:
    """:func:`model_input` strings with the title's end spelled " TITLE_MARK ", so that a whole string can be
    normalised and cut at once and the title's tokens still be told apart (those before the mark). A mark already in
    a text (private-use characters do turn up in old exports) becomes a space, which cuts the text the same way."""
    marked = f" {TITLE_MARK} "
    return [
        (text.replace(TITLE_MARK, " ") if TITLE_MARK in text else text).replace(TITLE_END, marked, 1) for text in texts
    ]


def _read_word_list(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _builtin_path(name: str) -> Path:
    return resource(name)


@lru_cache(maxsize=8)
def load_stopwords(spec: str | None) -> frozenset[str]:
    """Stop words: 'builtin' (stopwords-iso Chinese list plus the project's additions), a file, or none."""
    if spec is None:
        return frozenset()
    if spec == BUILTIN:
        import stopwordsiso

        words = set(stopwordsiso.stopwords("zh")) | set(_read_word_list(_builtin_path("stopwords_extra.txt")))
        return frozenset(words)
    return frozenset(_read_word_list(spec))


def user_dict_path(spec: str | None) -> Path | None:
    """Resolve the user dictionary setting to a file path (or None)."""
    if spec is None:
        return None
    path = _builtin_path("userdict.txt") if spec == BUILTIN else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"user dictionary not found: {path}")
    return path


def _user_dict_entries(path: Path | None) -> list[tuple[str, int | None, str | None]]:
    entries: list[tuple[str, int | None, str | None]] = []
    if path is None:
        return entries
    for line in _read_word_list(path):
        parts = line.split()
        freq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        tag = parts[2] if len(parts) > 2 else None
        entries.append((parts[0], freq, tag))
    return entries


class Segmenter:
    """Cuts normalised text into words and drops punctuation and stop words.

    The backend object is built lazily and left out of pickles, so a model carrying a Segmenter pickles small and
    each worker process builds its own dictionary once. The user dictionary's entries and the stop words are read
    once, when the segmenter is made (at training), and travel in its pickle: a model cuts text the way it was
    trained to on any machine (another analyst's, a Dask worker, the server), even where the word-list files, or
    the stopwords-iso release, differ or are missing.
    """

    def __init__(
        self,
        backend: str = "rjieba",
        user_dict: str | None = BUILTIN,
        stopwords: str | None = BUILTIN,
        keep_only: Iterable[str] | None = None,
    ) -> None:
        if backend not in ("rjieba", "jieba"):
            raise ValueError(f"unknown segmentation backend {backend!r}: use 'rjieba' or 'jieba'")
        self.backend = backend
        self.user_dict = user_dict
        self.stopwords_spec = stopwords
        # keep_only: for models trained on pre-segmented text, words the training data never had (its stop words
        # among them) are dropped so that n-grams form across the same neighbours as in training.
        self.keep_only = frozenset(keep_only) if keep_only is not None else None
        self.user_entries: list[tuple[str, int | None, str | None]] | None = _user_dict_entries(
            user_dict_path(user_dict)
        )
        self.stopword_list: tuple[str, ...] | None = tuple(sorted(load_stopwords(stopwords)))
        self._cut = None
        self._stopwords: frozenset[str] | None = None
        self._verdicts: dict[str, bool] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cut"] = None
        state["_stopwords"] = None
        state["_verdicts"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_verdicts", {})  # segmenters pickled before the verdict cache existed
        # Segmenters pickled before they carried their word lists read them from their settings, as they did then.
        state.setdefault("user_entries", None)
        state.setdefault("stopword_list", None)
        self.__dict__.update(state)

    def _build(self) -> None:
        entries = self.user_entries
        if entries is None:
            entries = _user_dict_entries(user_dict_path(self.user_dict))
        if self.backend == "rjieba":
            import rjieba

            engine = rjieba.Jieba()
            for word, freq, tag in entries:
                engine.add_word(word, freq, tag)
            self._cut = engine.cut
        else:
            import logging

            import jieba

            jieba.setLogLevel(logging.WARNING)
            engine = jieba.Tokenizer()
            for word, freq, tag in entries:
                engine.add_word(word, freq, tag)
            self._cut = lambda text: engine.lcut(text, HMM=True)
        self._stopwords = (
            load_stopwords(self.stopwords_spec) if self.stopword_list is None else frozenset(self.stopword_list)
        )

    def raw_cut(self, text: str) -> list[str]:
        """The backend's tokens, nothing removed."""
        if self._cut is None:
            self._build()
        return self._cut(text)

    VERDICT_CACHE_LIMIT = 500_000  # distinct tokens whose keep/drop verdict is remembered

    def keeps(self, token: str) -> bool:
        """Whether :meth:`filter` keeps ``token``: not whitespace, punctuation, a stop word or outside ``keep_only``."""
        if self._stopwords is None:
            self._build()
        if token in self._stopwords or _NON_WORD_TOKEN.fullmatch(token) or token.isspace():
            return False
        return self.keep_only is None or token in self.keep_only

    def _learn(self, token: str) -> bool:
        if len(self._verdicts) > self.VERDICT_CACHE_LIMIT:
            self._verdicts.clear()
        verdict = self._verdicts[token] = self.keeps(token)
        return verdict

    def filter(self, tokens: Iterable[str]) -> list[str]:
        """Drop whitespace, punctuation-only tokens, stop words and (if set) words outside ``keep_only``."""
        # The verdict per distinct token is cached: a text's tokens are mostly words seen many times before.
        known = self._verdicts.get
        return [token for token in tokens if known(token) or (known(token) is None and self._learn(token))]

    def cut(self, text: str) -> list[str]:
        """Segment a normalised text into content words."""
        return self.filter(self.raw_cut(text)) if text else []

    def raw_cut_many(self, texts: Sequence[str]) -> list[list[str]]:
        """:meth:`raw_cut` for each normalised text (empty texts give no tokens)."""
        if self._cut is None:
            self._build()
        cut = self._cut
        return [cut(text) if text else [] for text in texts]

    JOIN = "\n"  # normalised texts hold no newline, and the segmenters give each one its own token

    def raw_cut_joined(self, texts: Sequence[str]) -> list[str] | None:
        """The raw tokens of all ``texts`` from one call of the segmenter, texts joined by a newline.

        Text ``i``'s tokens lie between the ``i-1``-th and ``i``-th newline token. None when a text holds a newline
        itself: then use :meth:`raw_cut_many`. The caller finds the newline tokens (by code, see
        :class:`sanshi_ml.core.features.TokenCodes`) and must check there are ``len(texts) - 1`` of them, in case the
        segmenter merged one into another token. Both segmenters cut text in blocks that end at whitespace, so the
        tokens are those of the texts cut one by one (tests/code/test_fast_paths.py), and one call instead of one
        per text saves rjieba a fifth of its time.
        """
        if self._cut is None:
            self._build()
        joined = self.JOIN.join(texts)
        if not texts or joined.count(self.JOIN) != len(texts) - 1:
            return None
        return self._cut(joined)

    @staticmethod
    def split_joined(tokens: list[str], separators: list[int]) -> list[list[str]]:
        """Each text's raw tokens from :meth:`raw_cut_joined`'s output (the separators left out)."""
        bounds = [-1, *separators, len(tokens)]
        return [tokens[start + 1 : end] for start, end in zip(bounds, bounds[1:])]

    def cut_many(self, texts: Sequence[str]) -> list[list[str]]:
        """:meth:`cut` for each normalised text."""
        if self._cut is None:
            self._build()
        cut, keep = self._cut, self.filter
        return [keep(cut(text)) if text else [] for text in texts]


def split_segmented(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Tokens of an already segmented text: split on whitespace, never segmented a second time."""
    return [token for token in text.split() if token not in stopwords and not _NON_WORD_TOKEN.fullmatch(token)]
