"""Experiment tracking on MLflow.

The embedded default is a sqlite store in the working directory (`sqlite:///mlflow.db`); on a cluster,
a tracking server URI. Nothing assumes a file store. Runs are identified by a stable key (a tag), so a
retried or resumed trial continues its run instead of creating a second one. Metrics are batched."""
from __future__ import annotations

import time
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MLflowTracker:
    def __init__(self, uri: str = DEFAULT_URI, experiment: str = "cepdist"):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def find(self, key: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.cepdist_key = '{key}'",
                                       max_results=1)
        return runs[0] if runs else None

    def runs(self) -> list:
        """All runs of the experiment (every page)."""
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def start(self, key: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The run for `key`: the existing one (a retried/resumed trial) or a new one."""
        from mlflow.entities import Param
        run = self.find(key)
        if run is not None:
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"cepdist_key": key, **tags})
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int):
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v == v]
        for i in range(0, len(ms), 500):
            self.client.log_batch(run_id, metrics=ms[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]):
        from mlflow.entities import RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED", cause: str | None = None):
        """End a run: FINISHED, FAILED (with its cause as a tag) or KILLED. A run that failed in an earlier
        attempt and now finishes keeps that cause as `earlier_failure`, so `tags.failure` marks failed runs only."""
        if cause:
            self.set_tags(run_id, {"failure": cause[:5000]})
        elif status == "FINISHED":
            earlier = self.client.get_run(run_id).data.tags.get("failure")
            if earlier is not None:
                self.set_tags(run_id, {"earlier_failure": earlier})
                self.client.delete_tag(run_id, "failure")
        self.client.set_terminated(run_id, status)
