"""A trained model as an MLflow model that answers under a budget.

Every finished training leaves its selected weights (``best.pt``), its config and what makes it
adaptive: the output costs, and for early-exit networks the held-out confidences the thresholds are
calibrated from (so any budget gets the thresholds the budgeted evaluation would give it, and the
evaluated budgets their logged ones). :func:`log_model` saves these as a pyfunc model of the run
(with the code it needs, an input signature and example, and a ``budget`` parameter) and, with
``run.register_model=NAME``, registers it.

:class:`Budgeted` answers a batch of images under a budget (MACs per image), one wrapper over the
three prediction shapes:

- early exits: the thresholds of that budget, run by the real early-exit engine;
- sub-networks (ADN): the most accurate one on the held-out split whose cost fits;
- gated (DMNN): the network as trained; its executed cost per image is reported.

Each row of the answer: ``prediction`` (class index), ``output`` (the exit, the sub-network, or the
gate pattern taken) and ``mmacs`` (the MACs it cost). A budget outside [cheapest output, dearest
output] and images of the wrong shape are refused with one message each.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dynlab.errors import ConfigError

META_FILE = "budgets.json"
CONFIDENCE_FILE = "heldout_confidence.npy"


class Budgeted:
    """A loaded model and what it needs to answer under a budget (see the module doc)."""

    def __init__(self, cfg, method, model: torch.nn.Module, meta: dict, heldout_conf: np.ndarray | None = None):
        self.cfg, self.method, self.model, self.meta = cfg, method, model.eval(), meta
        self.costs = torch.tensor(meta["costs"], dtype=torch.float64)
        self.conf = None if heldout_conf is None else torch.from_numpy(heldout_conf)

    @classmethod
    def load(cls, folder: str | Path) -> "Budgeted":
        """From a folder holding ``config.yaml``, ``best.pt`` and the meta files (a logged model's
        artifacts)."""
        import yaml

        from dynlab import config, training
        from dynlab.registry import DatasetInfo

        folder = Path(folder)
        training.import_plugins(["methods"])
        cfg = config.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        meta = json.loads((folder / META_FILE).read_text())
        method, model = training.load_trained(cfg, folder, DatasetInfo(**meta["info"]))
        conf = np.load(folder / CONFIDENCE_FILE) if (folder / CONFIDENCE_FILE).exists() else None
        return cls(cfg, method, model, meta, conf)

    @property
    def range(self) -> tuple[float, float]:
        """The cheapest and the dearest cost per image (MACs) it can answer at."""
        return float(self.meta["cheapest"]), float(self.meta["dearest"])

    def check_budget(self, budget: float | None) -> float:
        lo, hi = self.range
        if budget is None:
            return hi
        b = float(budget)
        if not (math.isfinite(b) and lo * (1 - 1e-9) <= b <= hi * (1 + 1e-9)):
            raise ConfigError("budget", budget, f"MACs per image within [{lo:.6g}, {hi:.6g}], the costs of this model's cheapest and dearest output")
        return b

    def check_images(self, images) -> torch.Tensor:
        info = self.meta["info"]
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        want = (info["channels"], info["image_size"], info["image_size"])
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError("images", f"shape {tuple(x.shape)}", f"a batch [N, {want[0]}, {want[1]}, {want[2]}] of images normalised as the model was trained ({info['channels']} channels, {info['image_size']}x{info['image_size']} pixels)")
        return x

    def thresholds(self, budget: float) -> torch.Tensor:
        """An early-exit network's thresholds for ``budget``: the logged ones of an evaluated budget,
        else solved on the held-out confidences as the evaluation solves them."""
        from dynlab import evaluation

        for row in self.meta.get("calibrated", []):
            if math.isclose(row["budget"], budget, rel_tol=1e-9):
                return torch.tensor([float(t) for t in row["thresholds"]], dtype=torch.float64)
        if self.conf is None:  # trained without a held-out split: the last exit for everyone
            return torch.tensor([math.inf] * (len(self.costs) - 1) + [-math.inf], dtype=torch.float64)
        _, t = evaluation.solve_q(self.conf, self.costs, budget)
        return t

    @torch.no_grad()
    def __call__(self, images, budget: float | None = None) -> pd.DataFrame:
        b, x = self.check_budget(budget), self.check_images(images)
        kind = self.meta["kind"]
        if kind == "exit":
            from dynlab import early_exit, evaluation

            t = self.thresholds(b)
            if early_exit.supports_early_exit(self.model):
                r = early_exit.early_exit(self.model, x, t)
                pred, taken = r.pred, r.exit
            else:  # every exit computed, the same rule applied
                preds = self.method.predict(self.model, x)
                conf, p = evaluation.confidence(preds.logits)
                taken = evaluation.exit_indices(conf, t)
                pred = p[taken, torch.arange(x.shape[0])]
            names = self.meta["names"]
            return pd.DataFrame({"prediction": pred.long().numpy(), "output": [names[i] for i in taken.tolist()], "mmacs": self.costs[taken].numpy() / 1e6})
        if kind == "subnet":
            name = self.best_subnet(b)
            if hasattr(self.method, "predict_subnet"):
                logits = self.method.predict_subnet(self.model, x, name)
            else:
                preds = self.method.predict(self.model, x)
                logits = preds.logits[preds.names.index(name)]
            cost = self.costs[self.meta["names"].index(name)].item()
            return pd.DataFrame({"prediction": logits.argmax(1).numpy(), "output": name, "mmacs": np.full(x.shape[0], cost / 1e6)})
        preds = self.method.predict(self.model, x)  # gated
        pattern = ["".join("1" if g > 0.5 else "0" for g in row) for row in preds.gates.tolist()] if preds.gates is not None else ["gated"] * x.shape[0]
        return pd.DataFrame({"prediction": preds.logits.argmax(1).numpy(), "output": pattern, "mmacs": preds.costs.double().numpy() / 1e6})

    def best_subnet(self, budget: float) -> str:
        """The most accurate sub-network on the held-out split whose cost fits ``budget`` (the
        cheaper of equals)."""
        fits = [(acc, -c, n) for n, c, acc in zip(self.meta["names"], self.meta["costs"], self.meta["heldout_accuracy"]) if c <= budget * (1 + 1e-9)]
        return max(fits)[2]


def meta_of(cfg, info, tables, ev) -> tuple[dict, np.ndarray | None]:
    """What :class:`Budgeted` needs beside the weights, from a trial's prediction tables and
    evaluation: output names and costs, held-out accuracies, calibrated thresholds."""
    from dynlab import evaluation
    from dynlab.predictions import ExitPredictions, GatedPredictions

    test, _ = evaluation.frame_to_predictions(tables.test, "test")
    from dynlab import data

    meta: dict[str, Any] = {"info": dict(vars(info)), "method": cfg.method, "backbone": cfg.backbone, "classes": data.class_names(cfg.data)}
    conf = None
    if isinstance(test, GatedPredictions):
        heldout = tables.heldout if not tables.heldout.empty else tables.test
        h, _ = evaluation.frame_to_predictions(heldout, "heldout" if heldout is tables.heldout else "test")
        # dearest: every gate open, controllers included (they cost a little beyond the dense network)
        full = max(float(test.full_cost or 0.0), float(h.costs.max()), float(test.costs.max()))
        meta |= {"kind": "gated", "names": ["gated"], "costs": [full], "cheapest": min(float(h.costs.min()), float(test.costs.min())), "dearest": full}
        return meta, None
    names = list(getattr(test, "names", [f"exit{i + 1}" for i in range(test.num_outputs)]))
    costs = [float(c) for c in test.costs]
    meta |= {"names": names, "costs": costs, "cheapest": min(costs), "dearest": max(costs)}
    if not tables.heldout.empty:
        heldout, labels = evaluation.frame_to_predictions(tables.heldout, "heldout")
        conf_h, pred_h = evaluation.confidence(heldout.logits)
        meta["heldout_accuracy"] = [float(a) for a in ((pred_h == torch.as_tensor(labels)).double().mean(1) * 100)]
        if isinstance(heldout, ExitPredictions):
            conf = conf_h.double().numpy()
    else:  # no held-out split: the test accuracies order the sub-networks
        meta["heldout_accuracy"] = [float(a) for a in ev.anytime.sort_values("index")["accuracy"]]
    meta["kind"] = "exit" if isinstance(test, ExitPredictions) else "subnet"
    if meta["kind"] == "exit":
        if conf is None:  # data.heldout=0: nothing to calibrate thresholds on, so only the last exit (every image runs the whole network)
            meta["cheapest"] = meta["dearest"]
        if ev.budgeted is not None:
            rows = ev.budgeted[ev.budgeted["mode"] == "budget"]
            meta["calibrated"] = [{"budget": float(r["requested_budget"]), "thresholds": [t if math.isfinite(t) else ("inf" if t > 0 else "-inf") for t in r["thresholds"]]} for _, r in rows.iterrows()]
    return meta, conf


def pyfunc_class():
    """The MLflow pyfunc around :class:`Budgeted` (defined here so that mlflow is imported only
    where a model is saved or loaded)."""
    import mlflow.pyfunc

    class BudgetedPyfunc(mlflow.pyfunc.PythonModel):
        """Budgeted inference: images [N, C, H, W] (float32, normalised as in training) and the
        parameter ``budget`` (MACs per image) -> prediction, output, mmacs per image."""

        def load_context(self, context):
            self.budgeted = Budgeted.load(Path(context.artifacts["model"]))

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            if isinstance(model_input, pd.DataFrame):
                raise MlflowException("images: expected a tensor input [N, C, H, W] ('inputs' in a REST request), got a table", INVALID_PARAMETER_VALUE)
            try:
                return self.budgeted(model_input, (params or {}).get("budget"))
            except ConfigError as err:  # a 400 over REST, with our message
                raise MlflowException(str(err), INVALID_PARAMETER_VALUE) from None

    return BudgetedPyfunc


def save_model(cfg, checkpoint_dir: str | Path, info, tables, ev, path: Path) -> dict:
    """The pyfunc model folder at ``path``; returns its meta."""
    import shutil

    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from dynlab import storage, training

    meta, conf = meta_of(cfg, info, tables, ev)
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "model"
        art.mkdir()
        storage.copy_files(str(checkpoint_dir), art, (training.BEST_FILE, "config.yaml"))
        (art / META_FILE).write_text(json.dumps(meta, indent=1))
        if conf is not None:
            np.save(art / CONFIDENCE_FILE, conf)
        shape = (-1, info.channels, info.image_size, info.image_size)
        signature = ModelSignature(  # any 4-d shape passes MLflow's check, so that a wrong one gets our message (the shape is in the metadata)
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]),
            params=ParamSchema([ParamSpec("budget", "double", float(meta["dearest"]))]),
        )
        code = [str(Path(__file__).resolve().parent), *_plugin_packages(cfg)]
        example = np.zeros((1, *shape[1:]), dtype=np.float32)
        if path.exists():
            shutil.rmtree(path)
        with warnings.catch_warnings():  # "add type hints to predict": the signature above is the contract
            warnings.filterwarnings("ignore", message=".*type hints.*")
            mlflow.pyfunc.save_model(
                str(path), python_model=str(Path(__file__).resolve().parent / "served_model.py"), artifacts={"model": str(art)}, code_paths=code, signature=signature, input_example=(example, {"budget": float(meta["dearest"])}),
                pip_requirements=_requirements(), metadata={"dynlab": {**{k: meta[k] for k in ("kind", "names", "costs", "cheapest", "dearest", "method", "backbone")}, "input_shape": list(shape)}},
            )
    return meta


def _plugin_packages(cfg) -> list[str]:
    """The folders of the packages that registered the method and the backbone (``methods``): the
    code a loaded model needs beside dynlab."""
    import sys

    from dynlab.registry import get_backbone, get_method

    tops = {get_method(cfg.method).cls.__module__.split(".")[0], get_backbone(cfg.backbone).build.__module__.split(".")[0]}
    return sorted(str(Path(sys.modules[t].__file__).resolve().parent) for t in tops)


def _requirements() -> list[str]:
    """The packages the model needs, at the versions of this environment (not inferred: inferring
    loads the model in a subprocess, seconds per run)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "numpy", "pandas", "pyyaml", "mlflow")]


def log_model(handle, cfg, checkpoint_dir: str | Path, info, tables, ev) -> str:
    """Log the run's selected model as an MLflow model (a LoggedModel of the run, shown in its Model
    column); with ``run.register_model`` register it as a new version. Returns the model id."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    client = MlflowClient(handle.uri)
    acc = float(ev.anytime["accuracy"].max()) if len(ev.anytime) else math.nan
    tags = {"dynlab.method": cfg.method, "dynlab.backbone": cfg.backbone, "dynlab.dataset": cfg.data.name, "dynlab.test_accuracy": f"{acc:.2f}"}
    model = client.create_logged_model(handle.experiment_id, name="model", source_run_id=handle.run_id, tags=tags, model_type="dynlab-budgeted")
    try:
        with tempfile.TemporaryDirectory() as d:
            save_model(cfg, checkpoint_dir, info, tables, ev, Path(d) / "model")
            client.log_model_artifacts(model.model_id, str(Path(d) / "model"))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(handle.run_id, [LoggedModelOutput(model.model_id, step=0)])
    if cfg.run.register_model:
        from mlflow.exceptions import MlflowException

        from dynlab.tracking import mlflow_global_uri

        try:
            client.create_registered_model(cfg.run.register_model)
        except MlflowException as err:  # it exists: a new version of it
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        with mlflow_global_uri(handle.uri):  # the version's models:/ source is resolved through MLflow's global URI
            client.create_model_version(cfg.run.register_model, f"models:/{model.model_id}", run_id=handle.run_id, tags=tags, model_id=model.model_id)
    return model.model_id
