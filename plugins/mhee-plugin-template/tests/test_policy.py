"""Tests for the template's exit policy: the SDK's conformance suite, then its own behaviour.

Keep the first test when you copy the template: it runs every contract check the engine relies on.
"""

from __future__ import annotations

import numpy as np
import pytest
from mhee_plugin_template import ConsecutiveConfident  # rename: your package and class

from mhee_sdk.exits.policies import replay
from mhee_sdk.registry import Registry
from mhee_sdk.testing import check_exit_policy


@pytest.mark.parametrize("params", [{}, {"count": 1, "threshold": 0.6}, {"count": 4, "threshold": 0.95}])
def test_keeps_the_exit_policy_contract(params):
    check_exit_policy(ConsecutiveConfident(**params))


def test_exits_after_count_confident_heads():
    layers = [3, 6, 9, 12]
    probs = np.array(
        [
            [0.95, 0.97, 0.50, 0.50],  # confident twice at once: stops at layer 6
            [0.95, 0.05, 0.90, 0.10],  # confident every time, class flips: still stops at 6 (no agreement needed)
            [0.60, 0.95, 0.50, 0.99],  # never two confident heads in a row: full depth
            [0.70, 0.85, 0.81, 0.40],  # 0.85 and 0.81 are both >= 0.8: stops at 9
        ]
    )
    result = replay(ConsecutiveConfident(count=2, threshold=0.8), probs, layers)
    assert result.layer.tolist() == [6, 6, 12, 9]
    assert result.prob.tolist() == [0.97, 0.05, 0.99, 0.81]
    # count=1 is max-prob: the first confident head stops the row
    assert replay(ConsecutiveConfident(count=1, threshold=0.8), probs, layers).layer.tolist() == [3, 3, 6, 6]


def test_never_stops_before_count_heads_ran():
    sure = np.full((3, 2), 0.99)
    assert ConsecutiveConfident(count=3).decide(6, sure).tolist() == [False, False, False]


@pytest.mark.parametrize(
    ("params", "message"),
    [({"count": 0}, "count=0 must be an integer >= 1"), ({"threshold": 0.3}, r"threshold=0.3 is outside \[0.5, 1.0\]")],
)
def test_rejects_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        ConsecutiveConfident(**params)


def test_is_registered_through_the_entry_point():
    registry = Registry(allow=["template"])  # load only this plugin's entry point (plus the built-ins)
    entry, _ = registry.get("exit_policy", "consecutive-confident")
    assert entry.plugin == "template"
    policy = registry.create("exit_policy", "consecutive-confident", count=3, threshold=0.9)
    assert (policy.count, policy.threshold) == (3, 0.9)
