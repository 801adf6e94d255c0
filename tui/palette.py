"""The UI's colours, in one place: the panels' Rich styles import these names, and the stylesheet
(batchmon.tcss) uses them as ``$bm-*`` variables (BatchmonApp.get_css_variables adds CSS_VARIABLES).

Dark background, one accent (cyan) for focus and what-ifs, traffic-light colours for fit / tight / will not fit.
"""

from __future__ import annotations

BG = "#0b0d10"  # screen and panels
SURFACE = "#16191e"  # header, what-if bar, dialogs
FOCUS_BG = "#101419"  # a focused panel
BORDER = "#3a3d44"  # panel frames, empty bar cells
FAINT = "#5a5f68"  # the least important marks (the driver-reserved share of a bar)
DIM = "#8a8f98"  # labels and secondary text
ACCENT = "#3fc1c9"  # focus, agents, what-ifs
BLUE = "#4f8fe6"  # the predicted curve, the app's name
OK = "#6cc644"  # fits, headroom, live
WARN = "#f0b43c"  # tight, alloc retries, paused, warnings
BAD = "#e5484d"  # will not fit, OOM, the device limit
PURPLE = "#b07cf0"  # ranks of a job, replay
PINK = "#e0709a"  # a component's bar colour

#: the stylesheet's variables (``$bm-bg`` ...): the same colours by the same names
CSS_VARIABLES: dict[str, str] = {
    "bm-bg": BG, "bm-surface": SURFACE, "bm-focus-bg": FOCUS_BG, "bm-border": BORDER, "bm-faint": FAINT,
    "bm-dim": DIM, "bm-accent": ACCENT, "bm-blue": BLUE, "bm-ok": OK, "bm-warn": WARN, "bm-bad": BAD,
    "bm-purple": PURPLE, "bm-pink": PINK,
}
