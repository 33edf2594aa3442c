"""Matplotlib set-up shared by the evaluation plots and the archive report: headless backend and a CJK font.

Without a CJK font, Chinese labels render as empty boxes. The set-up (``make setup``) installs Debian's
``fonts-noto-cjk``; this module finds it (or another CJK font) and makes it the default sans-serif font.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

log = logging.getLogger(__name__)

CJK_FONT_NAMES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
                  "WenQuanYi Micro Hei", "Noto Sans CJK JP", "Noto Serif CJK SC", "AR PL UMing CN", "SimHei")


class FontMissingWarning(UserWarning):
    """No CJK font was found: Chinese text in plots will not render."""


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The name of an installed CJK font, or None."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    for name in CJK_FONT_NAMES:
        if name in installed:
            return name
    return None


def pyplot():
    """matplotlib.pyplot on the Agg backend with a CJK font selected; warns once if none is installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, *plt.rcParams["font.sans-serif"]]
        plt.rcParams["font.family"] = "sans-serif"
    else:
        warnings.warn("no CJK font found (install fonts-noto-cjk): Chinese labels will render as boxes",
                      FontMissingWarning, stacklevel=2)
    plt.rcParams["axes.unicode_minus"] = False
    return plt
