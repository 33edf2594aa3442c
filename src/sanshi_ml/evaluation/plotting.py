"""Matplotlib set-up shared by the evaluation plots and the archive report: headless backend and a CJK font.

Without a CJK font, Chinese labels render as empty boxes. The set-up (``make setup``) installs Debian's
``fonts-noto-cjk``; this module finds it (or another CJK font) and makes it the default sans-serif font.

matplotlib lists the system fonts once and caches the list (``fontlist-v*.json`` in ``matplotlib.get_cachedir()``,
under ``MPLCONFIGDIR``). A cache built before the font package was installed lists no CJK font, so when the cached
list has none, the font files of the known CJK families are looked up on disk and registered with
``fontManager.addfont`` for this process (the cache file itself is left alone). Only when no such file exists does
``pyplot()`` warn (``FontMissingWarning``). Importing the module changes nothing: the work happens on the first call.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from functools import lru_cache

log = logging.getLogger(__name__)

CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Noto Sans CJK JP",
    "Noto Serif CJK SC",
    "AR PL UMing CN",
    "SimHei",
)

# How the files of those families start, lower-cased without separators: NotoSansCJK-Regular.ttc (Debian
# fonts-noto-cjk), NotoSansSC-Regular.otf, SourceHanSansSC-Regular.otf, wqy-zenhei.ttc, wqy-microhei.ttc,
# uming.ttc (fonts-arphic-uming), simhei.ttf (Windows).
CJK_FONT_FILES = (
    "notosanscjk",
    "notoserifcjk",
    "notosanssc",
    "sourcehansans",
    "wqyzenhei",
    "wqymicrohei",
    "uming",
    "simhei",
)


class FontMissingWarning(UserWarning):
    """No CJK font was found: Chinese text in plots will not render."""


def _known_cjk_font(font_manager) -> str | None:
    """The first of CJK_FONT_NAMES that matplotlib's font list holds, or None."""
    listed = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONT_NAMES if name in listed), None)


def _cjk_font_files(font_manager) -> list[str]:
    """The system font files (paths only, none opened) whose names are those of the known CJK families."""

    def is_cjk(path: str) -> bool:
        stem = re.sub(r"[^a-z0-9]", "", os.path.basename(path).lower())
        return stem.startswith(CJK_FONT_FILES)

    return sorted(path for path in font_manager.findSystemFonts() if is_cjk(path))


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The name of an installed CJK font, or None.

    When matplotlib's cached font list has none (the cache predates the font), the CJK font files on disk are
    registered for this process. Runs once per process.
    """
    from matplotlib import font_manager

    name = _known_cjk_font(font_manager)
    if name:
        return name
    files = _cjk_font_files(font_manager)
    for path in files:
        try:
            font_manager.fontManager.addfont(path)
        except (OSError, RuntimeError, ValueError) as exc:  # an unreadable or broken font file
            log.debug("could not load font %s: %s", path, exc)
    name = _known_cjk_font(font_manager)
    if name:
        import matplotlib

        log.info(
            "matplotlib's font cache in %s lists no CJK font (it was built before the font was installed); "
            "registered %s from %s for this process (delete fontlist-v*.json there to rebuild the cache)",
            matplotlib.get_cachedir(),
            name,
            ", ".join(files),
        )
    return name


def pyplot():
    """matplotlib.pyplot on the Agg backend with a CJK font selected; warns once if none is installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, *(f for f in plt.rcParams["font.sans-serif"] if f != font)]
        plt.rcParams["font.family"] = "sans-serif"
    else:
        warnings.warn(
            "no CJK font found (install fonts-noto-cjk): Chinese labels will render as boxes",
            FontMissingWarning,
            stacklevel=2,
        )
    plt.rcParams["axes.unicode_minus"] = False
    return plt
