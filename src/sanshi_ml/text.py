"""Text normalisation, personal-data masking and word segmentation.

Every text goes through :func:`normalize` before anything is learned, logged or stored, so personal data never
reaches a model, a log line or the feedback database. Segmentation uses rjieba (the Rust build of jieba) by default;
the pure-Python jieba is selectable and produces the same tokens.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

BUILTIN = "builtin"

# Placeholders are plain ASCII words so that both segmenters keep each one as a single token.
PII_PLACEHOLDERS = {
    "email": "EMAIL",
    "id_card": "IDNUM",
    "mobile": "PHONE",
    "landline": "PHONE",
    "plate": "PLATE",
}

# Order matters: e-mail first (its local part may hold digits), then 18-digit ID numbers before the 11-digit mobiles
# they contain, then landlines, then licence plates.
_PII_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")),
    ("id_card", re.compile(
        r"(?<![0-9])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9])")),
    ("mobile", re.compile(r"(?<![0-9])(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?![0-9])")),
    ("landline", re.compile(r"(?<![0-9])(?:\(0\d{2,3}\)|0\d{2,3})[- ]?[2-9]\d{6,7}(?:-\d{1,4})?(?![0-9])")),
    ("plate", re.compile(
        r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-Za-z][·.]?[A-Za-z0-9]{5,6}(?![A-Za-z0-9])")),
]

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Only things shaped like tags are removed, so a stray "<" in a resident's text survives.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_WHITESPACE = re.compile(r"\s+")
_NON_WORD_TOKEN = re.compile(r"[\W_]+")


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def mask_pii(text: str) -> str:
    """Replace phone numbers, 身份证 numbers, e-mail addresses and licence plates by placeholder words."""
    for kind, pattern in _PII_PATTERNS:
        text = pattern.sub(f" {PII_PLACEHOLDERS[kind]} ", text)
    return text


def strip_html(text: str) -> str:
    """Remove HTML comments and tags and decode entities such as ``&nbsp;``."""
    if "<" in text:
        text = _HTML_TAG.sub(" ", _HTML_COMMENT.sub(" ", text))
    if "&" in text:
        text = html.unescape(text)
    return text


def normalize(text: str, *, to_simplified: bool = True, pii: bool = True, lowercase: bool = True) -> str:
    """NFKC, HTML removed, 繁→简, personal data masked, whitespace collapsed to single spaces."""
    if not text:
        return ""
    text = strip_html(unicodedata.normalize("NFKC", text))
    if to_simplified:
        text = _t2s().convert(text)
    if pii:
        text = mask_pii(text)
    if lowercase:
        text = text.lower()
        # Placeholders stay upper case so they are recognisable and never collide with real words.
        for placeholder in set(PII_PLACEHOLDERS.values()):
            text = text.replace(placeholder.lower(), placeholder)
    return _WHITESPACE.sub(" ", text).strip()


def compose(title: str | None, text: str | None) -> str:
    """The model's input: title and text joined, the way records are joined at training time."""
    title = (title or "").strip()
    text = (text or "").strip()
    if title and text:
        return f"{title}\n{text}"
    return title or text


def _read_word_list(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _builtin_path(name: str) -> Path:
    return Path(__file__).with_name("resources") / name


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
    each worker process builds its own dictionary once.
    """

    def __init__(self, backend: str = "rjieba", user_dict: str | None = BUILTIN,
                 stopwords: str | None = BUILTIN, keep_only: Iterable[str] | None = None) -> None:
        if backend not in ("rjieba", "jieba"):
            raise ValueError(f"unknown segmentation backend {backend!r}: use 'rjieba' or 'jieba'")
        self.backend = backend
        self.user_dict = user_dict
        self.stopwords_spec = stopwords
        # keep_only: for models trained on pre-segmented text, words the training data never had (its stop words
        # among them) are dropped so that n-grams form across the same neighbours as in training.
        self.keep_only = frozenset(keep_only) if keep_only is not None else None
        self._cut = None
        self._stopwords: frozenset[str] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cut"] = None
        state["_stopwords"] = None
        return state

    def _build(self) -> None:
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
        self._stopwords = load_stopwords(self.stopwords_spec)

    def raw_cut(self, text: str) -> list[str]:
        """The backend's tokens, nothing removed."""
        if self._cut is None:
            self._build()
        return self._cut(text)

    def filter(self, tokens: Iterable[str]) -> list[str]:
        """Drop whitespace, punctuation-only tokens, stop words and (if set) words outside ``keep_only``."""
        if self._stopwords is None:
            self._build()
        stop = self._stopwords
        keep = self.keep_only
        out = []
        for token in tokens:
            if token in stop or _NON_WORD_TOKEN.fullmatch(token) or token.isspace():
                continue
            if keep is not None and token not in keep:
                continue
            out.append(token)
        return out

    def cut(self, text: str) -> list[str]:
        """Segment a normalised text into content words."""
        return self.filter(self.raw_cut(text)) if text else []

    def cut_many(self, texts: Sequence[str]) -> list[list[str]]:
        return [self.cut(text) for text in texts]


def split_segmented(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Tokens of an already segmented text: split on whitespace, never segmented a second time."""
    return [token for token in text.split() if token not in stopwords and not _NON_WORD_TOKEN.fullmatch(token)]
