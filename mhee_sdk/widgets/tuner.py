"""PolicyTuner: move an exit policy's parameters over a logged full-depth run and watch quality and depth."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd

from mhee_sdk import plots
from mhee_sdk.exits.policies import FULL_DEPTH
from mhee_sdk.interfaces import CalibratedPolicy, ExitPolicy, Knob, TunablePolicy
from mhee_sdk.registry import Registry, get_registry
from mhee_sdk.store import ReplayResult, Store, StoreError
from mhee_sdk.widgets.rendering import StaticFallback, escape, show_figures

METRICS = {"auc": "AUC {:.4f}", "logloss": "LogLoss {:.4f}", "mean_exit_layer": "mean exit layer {:.2f}",
           "layer_savings": "est. speedup {:.2f}x"}  # fmt: skip
READ_ONLY_TIP = "The store was opened read-only; open it with Store.open(path) to save runs."


def knobs_of(policy: ExitPolicy) -> tuple[Knob, ...]:
    """The sliders a policy declares (``interfaces.TunablePolicy``); none for the others."""
    return tuple(policy.knobs) if isinstance(policy, TunablePolicy) else ()


def tunable_policies(registry: Registry) -> list[str]:
    """Registered policies that replay as they are: not families, and none that must calibrate first."""
    names = []
    for name in registry.names("exit_policy"):
        if name.endswith("<spec>"):
            continue
        try:
            policy = registry.create("exit_policy", name)
        except (TypeError, ValueError):  # a plugin policy that needs arguments we have no slider for
            continue
        if not isinstance(policy, CalibratedPolicy):  # calibration needs validation outputs, which the store lacks
            names.append(name)
    return names


class PolicyTuner(StaticFallback, widgets.VBox):
    """Replay a policy over a full-depth run as its sliders move: AUC, LogLoss, depth, and its Pareto curve."""

    def __init__(self, store: Store, run_id: str, policy: str = "max-prob", registry: Registry | None = None) -> None:
        self.store, self.run_id = store, run_id
        self.registry = registry or get_registry()
        self.record = store.run(run_id)
        used = self.record["config"].get("policy", self.record["kind"])
        if self.record["status"] != "finished" or used != FULL_DEPTH or self.record["kind"] != "live":
            candidates = store.full_depth_runs(self.record["requests_key"])
            hint = f"make one with Experiment.run({FULL_DEPTH!r}, store=store)"
            if candidates:
                hint = f"pass one of: {', '.join(candidates)}"
            raise ValueError(
                f"PolicyTuner needs a finished full-depth run (policy {FULL_DEPTH!r}, every exit layer logged); run "
                f"{run_id!r} is {self.record['status']} with policy {used!r}: {hint}"
            )
        _, self.exit_layers, _ = store.layer_matrix(run_id)  # raises if some request lacks a layer
        names = tunable_policies(self.registry)
        if policy not in names:
            raise ValueError(f"policy {policy!r} cannot be tuned here; choose from: {', '.join(names)}")
        self.policy_select = widgets.Dropdown(options=names, value=policy, description="policy")
        self.policy_select.add_class("mhee-policy-select")
        self.save_button = widgets.Button(description="save as run", icon="save")
        if store.read_only:
            self.save_button.disabled, self.save_button.tooltip = True, READ_ONLY_TIP
        self.sliders: dict[str, widgets.ValueWidget] = {}
        self.sliders_box = widgets.VBox()
        self.metric_labels = {
            name: widgets.Label(layout=widgets.Layout(margin="0 2em 0 0")).add_class(f"mhee-metric-{name}")
            for name in METRICS
        }
        self.status = widgets.HTML()
        self.pareto = widgets.Output()
        self.current_replay: ReplayResult | None = None
        self.current_metrics: dict[str, float] = {}
        self.sweeps: dict[tuple, pd.DataFrame] = {}
        self.heading = widgets.HTML(f"<h3>Tune an exit policy on run {escape(self.record['name'])} "
                                  f"<code>{escape(run_id)}</code> (replayed, no model run)</h3>")  # fmt: skip
        super().__init__(children=[
            self.heading, widgets.HBox([self.policy_select, self.save_button]), self.sliders_box,
            widgets.HBox(list(self.metric_labels.values())), self.status,
            self.pareto,
        ])  # fmt: skip
        self.add_class("mhee-policy-tuner")
        self.policy_select.observe(lambda _: self._build_sliders(), "value")
        self.save_button.on_click(lambda _: self._save_clicked())
        self._build_sliders()

    @property
    def current_params(self) -> dict[str, Any]:
        """The policy parameters the sliders are on."""
        return {name: round(s.value, 6) if isinstance(s.value, float) else s.value for name, s in self.sliders.items()}

    def _build_sliders(self) -> None:
        for old in self.sliders.values():
            old.close()
        self.knobs = knobs_of(self.registry.create("exit_policy", self.policy_select.value))
        self.sliders = {knob.name: self._slider(knob) for knob in self.knobs}
        for slider in self.sliders.values():
            slider.observe(lambda _: self.update(), "value")
        self.sliders_box.children = list(self.sliders.values())
        self.update()

    def _slider(self, knob: Knob) -> widgets.ValueWidget:
        name = knob.name
        common = {"description": name, "continuous_update": False, "layout": widgets.Layout(width="28em")}
        if knob.exit_layers:
            middle = self.exit_layers[len(self.exit_layers) // 2]
            slider = widgets.SelectionSlider(options=self.exit_layers, value=middle, **common)
        elif knob.integer:
            slider = widgets.IntSlider(
                min=int(knob.low), max=int(knob.high), step=int(knob.step), value=int(knob.default), **common
            )
        else:
            slider = widgets.FloatSlider(min=knob.low, max=knob.high, step=knob.step, value=knob.default, **common)
        return slider.add_class(f"mhee-knob-{name}")

    def update(self) -> None:
        """Replay the current setting; refresh the labels and the Pareto plot."""
        name, params = self.policy_select.value, self.current_params
        self.current_replay = self.store.replay(self.run_id, self.registry.create("exit_policy", name, **params))
        self.current_metrics = dict(self.current_replay.metrics)
        for metric, label in self.metric_labels.items():
            label.value = METRICS[metric].format(self.current_metrics[metric])
        sweep = self._sweep(name, params)
        figure = plots.pareto(sweep, label="setting", highlight=(self.current_metrics["mean_exit_layer"],
                                                                 self.current_metrics["auc"]))  # fmt: skip
        main = next(iter(self.sliders), None)
        figure.axes[0].set_title(f"{name}: {main} swept" if main else name)
        show_figures(self.pareto, [figure])

    def _sweep(self, name: str, params: dict[str, Any]) -> pd.DataFrame:
        """The main parameter swept, the others as set now; cached per policy and other parameters."""
        knobs = {knob.name: knob for knob in self.knobs}
        main = next(iter(knobs), None)
        others = {key: value for key, value in params.items() if key != main}
        key = (name, tuple(sorted(others.items())))
        if key not in self.sweeps:
            grid = self._grid(knobs[main]) if main else [None]
            settings = [others if value is None else {**others, main: value} for value in grid]
            policies = [self.registry.create("exit_policy", name, **setting) for setting in settings]
            frame = self.store.sweep(self.run_id, policies)
            frame["setting"] = ["" if value is None else f"{value:g}" for value in grid]
            self.sweeps[key] = frame
        return self.sweeps[key]

    def _grid(self, knob: Knob) -> list[Any]:
        if knob.exit_layers:
            return list(self.exit_layers)
        if knob.integer:
            return list(range(int(knob.low), int(knob.high) + 1))
        spaced = np.geomspace if knob.log else np.linspace
        return [round(float(v), 2) for v in spaced(knob.low, knob.high, 11)]

    def save_as_run(self, name: str = "") -> str:
        """Record the current setting as a finished ``replay`` run of this run's requests; returns its id."""
        if self.current_replay is None:
            self.update()
        policy, params = self.policy_select.value, self.current_params
        setting = ",".join(f"{k}={v}" for k, v in params.items())
        label = name or (f"{policy}({setting}) replay" if setting else f"{policy} replay")
        predictions = self.current_replay.predictions.merge(
            self.store.predictions(self.run_id)[["request_id", "item"]], on="request_id", how="left"
        )
        predictions["latency_s"] = np.nan  # a replay measures no time
        config = {**self.record["config"], "policy": policy, "policy_params": params, "name": label}
        origin = {"kind": "replay", "requests_key": self.record["requests_key"], "parent_run": self.run_id}
        with self.store.recording(config, self.exit_layers, self.record["num_layers"], name=label, **origin) as run_id:
            self.store.append(run_id, "predictions", predictions)
            self.store.add_metrics(run_id, self.current_metrics)
        self.status.value = f"saved as run <code>{escape(run_id)}</code> ({escape(label)})"
        return run_id

    def _save_clicked(self) -> None:
        try:
            self.save_as_run()
        except StoreError as err:  # shown where the user clicked; a callback's exception would go to a log
            self.status.value = f"<span style='color: #b00'>not saved: {escape(err)}</span>"

    def _static_parts(self) -> list[str | widgets.Output]:
        labels = " · ".join(label.value for label in self.metric_labels.values())
        setting = ", ".join(f"{k}={v}" for k, v in self.current_params.items())
        return [self.heading.value, f"<p><b>{escape(self.policy_select.value)}</b>({escape(setting)}): "
                f"{escape(labels)}</p>", self.pareto]  # fmt: skip
