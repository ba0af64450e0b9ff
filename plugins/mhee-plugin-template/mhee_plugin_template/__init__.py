"""Template mhee-sdk plugin: one exit policy, ``consecutive-confident``. Copy it to start your own."""

from mhee_plugin_template.policy import ConsecutiveConfident

__all__ = ["ConsecutiveConfident"]
