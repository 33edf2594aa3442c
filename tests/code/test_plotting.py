"""Chinese plot labels render even when matplotlib's font cache was built before the CJK font was installed.

matplotlib lists the system fonts once and caches the list (fontlist-v*.json under MPLCONFIGDIR). Anyone who used
matplotlib before ``make setup`` installed fonts-noto-cjk has a cache without it. The test builds a real cache in a
temporary MPLCONFIGDIR, removes the CJK fonts from it (what such a stale cache looks like) and renders Chinese text
in a fresh process reading that cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sanshi_ml.evaluation.plotting import CJK_FONT_NAMES

BUILD_CACHE = "import matplotlib.font_manager"

RENDER = """
import json, sys, warnings

from matplotlib import font_manager

stale = not any(font.name in NAMES for font in font_manager.fontManager.ttflist)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from sanshi_ml.evaluation.plotting import cjk_font, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.set_title("混淆矩阵")
    ax.set_xlabel("预测类别")
    ax.set_yticks([0, 1], labels=["公事", "家事"])
    fig.savefig(sys.argv[1])
    plt.close(fig)
print(json.dumps({"stale": stale, "font": cjk_font(),
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
""".replace("NAMES", repr(CJK_FONT_NAMES))


def _python(code: str, mplconfigdir, *args: str) -> str:
    env = {**os.environ, "MPLCONFIGDIR": str(mplconfigdir)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _no_cjk_font(reason: str) -> None:
    if os.environ.get("SANSHI_REQUIRE_REAL_DATA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def stale_mplconfigdir(tmp_path):
    """An MPLCONFIGDIR whose real font cache has its CJK fonts taken out, as if built before they were installed."""
    mplconfigdir = tmp_path / "mplconfig"
    mplconfigdir.mkdir()
    _python(BUILD_CACHE, mplconfigdir)
    (cache,) = mplconfigdir.glob("fontlist-v*.json")
    fontlist = json.loads(cache.read_text(encoding="utf-8"))
    # Every face of every file that holds a known CJK family: the cache of a machine without the font package.
    cjk_files = {font["fname"] for font in fontlist["ttflist"] if font["name"] in CJK_FONT_NAMES}
    if not cjk_files:
        _no_cjk_font(
            "no CJK font installed (a fresh matplotlib font cache lists none of "
            f"{', '.join(CJK_FONT_NAMES)}): run scripts/system-deps.sh font"
        )
    fontlist["ttflist"] = [font for font in fontlist["ttflist"] if font["fname"] not in cjk_files]
    cache.write_text(json.dumps(fontlist), encoding="utf-8")
    return mplconfigdir


def test_chinese_labels_render_with_a_font_cache_built_before_the_cjk_font(stale_mplconfigdir, tmp_path):
    png = tmp_path / "confusion.png"
    result = json.loads(_python(RENDER, stale_mplconfigdir, str(png)).splitlines()[-1])
    assert result["stale"], "the rewritten cache still lists a CJK font: the stale cache was not reproduced"
    assert result["font"] in CJK_FONT_NAMES
    assert not [w for w in result["warnings"] if "missing from font" in w or "FontMissingWarning" in w], result[
        "warnings"
    ]
    assert png.stat().st_size > 0


def test_without_a_cjk_font_on_disk_pyplot_still_warns(stale_mplconfigdir, tmp_path):
    # The same stale cache, and no CJK file to be found on disk either: nothing to register, so the warning stays.
    no_files = "from matplotlib import font_manager\nfont_manager.findSystemFonts = lambda *a, **k: []\n"
    result = json.loads(_python(no_files + RENDER, stale_mplconfigdir, str(tmp_path / "boxes.png")).splitlines()[-1])
    assert result["stale"] and result["font"] is None
    assert [w for w in result["warnings"] if w.startswith("FontMissingWarning")], result["warnings"]
