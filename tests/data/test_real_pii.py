"""Masking on the real petitions: it finds what is there and changes nothing else.

The messages were anonymised by the platform (phone numbers mostly written as 0000-00000000, names replaced), so
what personal data is left was inspected by hand: two landlines, one mobile written in groups, two licence plates.
Every other number in the 7,064 messages (dates such as 2019.04.08, amounts, room and building numbers, counts, the
platform's zeroed-out numbers) must come out as it went in.
"""

import re

import pytest

from sanshi_ml.core.text import PII_PLACEHOLDERS, mask_pii, normalize_many
from sanshi_ml.data.records import compose, read_table

pytestmark = pytest.mark.real_data

PLACEHOLDER = re.compile("|".join(sorted(set(PII_PLACEHOLDERS.values()))))
INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u206f\ufeff]")
# What masking replaces in the whole file, found by reading every match (two texts hold the same two plates).
EXPECTED_MASKED = {
    "0745-2232401": 1,
    "0735-6621655": 1,
    "189 7318 7780": 1,
    "赣A50397": 1,
    "鄂A600HV6": 1,
    "赣a50397": 1,
    "鄂a600hv6": 1,
}


@pytest.fixture(scope="module")
def texts(petitions_csv) -> list[str]:
    frame = read_table(petitions_csv)
    return [compose(title, text) for title, text in zip(frame["留言主题"].fillna(""), frame["留言详情"].fillna(""))]


def _replaced(before: str, after: str) -> list[str]:
    """The pieces of ``before`` that became a placeholder (written as " PHONE ") in ``after``; everything else in
    ``after`` must be ``before`` unchanged."""
    kept = re.split(f" (?:{PLACEHOLDER.pattern}) ", after)
    match = re.fullmatch("(.+?)".join(map(re.escape, kept)), before, flags=re.S)
    assert match is not None, (before, after)
    return list(match.groups())


def test_masking_changes_exactly_the_personal_data_in_the_real_petitions(texts):
    masked_pieces: dict[str, int] = {}
    for text in texts:
        masked = mask_pii(text)
        if masked == text:
            continue
        visible = INVISIBLE.sub("", text)
        if not PLACEHOLDER.search(masked):
            # Nothing masked: the only change allowed is an invisible character next to a letter or digit.
            assert INVISIBLE.sub("", masked) == visible, text
            continue
        for piece in _replaced(visible, INVISIBLE.sub("", masked)):
            masked_pieces[piece] = masked_pieces.get(piece, 0) + 1
    assert masked_pieces == EXPECTED_MASKED


def test_normalisation_masks_the_same_texts_and_keeps_every_other_number(texts):
    normalised = normalize_many(texts)
    unmasked = normalize_many(texts, pii=False)
    flagged = [i for i, text in enumerate(normalised) if PLACEHOLDER.search(text)]
    assert len(flagged) == 5
    changed = [i for i, (a, b) in enumerate(zip(normalised, unmasked)) if a != b]
    assert set(changed) - set(flagged) == {
        i for i in changed if INVISIBLE.sub("", normalised[i]) == INVISIBLE.sub("", unmasked[i])
    }
    # The numbers outside the masked pieces are all still there.
    numbers = re.compile(r"\d+")
    for i in changed:
        kept = numbers.findall(PLACEHOLDER.sub(" ", normalised[i]))
        assert set(kept) <= set(numbers.findall(unmasked[i]))
