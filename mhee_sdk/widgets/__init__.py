"""Notebook views of an evaluation store (ipywidgets 8 + matplotlib).

``from mhee_sdk.widgets import ExitExplorer, PolicyTuner, RunBrowser``; each also renders as a static
HTML/PNG snapshot where no kernel runs (nbconvert, GitHub).
"""

from __future__ import annotations

from mhee_sdk.widgets.browser import RunBrowser
from mhee_sdk.widgets.explorer import ExitExplorer
from mhee_sdk.widgets.tuner import PolicyTuner

__all__ = ["ExitExplorer", "PolicyTuner", "RunBrowser"]
