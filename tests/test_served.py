"""Trained models as MLflow models with budgeted inference (dynlab.served): the answer under a
budget equals the project's budgeted evaluation at that budget for an early-exit, an ADN and a DMNN
model; a logged model loads in a fresh process with only mlflow imported; bad budgets and images get
one message each; a registered model gets a version per run. Models are untrained (the equalities
hold for any weights) and scored on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import methods  # noqa: F401  (fills the registries)
from dynlab import config, data, evaluation, served, steps, training
from dynlab.errors import ConfigError
from dynlab.registry import get_method
from tests.test_storage import free_port

CASES = {
    "exit": ["method=boostnet", "backbone=msdnet"],
    "subnet": ["method=adn", "backbone=adn_resnet", "adn.subnets=[TTTT,FTFT,FFFF]"],
    "gated": ["method=dmnn", "preset=dmnn-resnet-small"],
}


def _trained(kind: str, folder: Path, seed: int = 0):
    """An untrained model of ``kind`` saved as a training leaves it, its prediction tables on digits
    (held-out and test) and its evaluation, as the pipeline's steps compute them."""
    cfg = config.cli_config([*CASES[kind], "data.name=digits", "data.heldout=200", "eval.budgets=[6.0]" if kind == "exit" else "eval.budgets=[]", f"run.seed={seed}"])
    info = data.dataset_info(cfg.data)
    torch.manual_seed(seed)
    model = get_method(cfg.method).cls(cfg).build_model(info)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, folder / training.BEST_FILE)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    tables = steps.predict(cfg, str(folder))
    return cfg, info, tables, steps.evaluate(cfg, tables)


def _test_images(cfg) -> tuple[np.ndarray, np.ndarray]:
    bundle = data.build_datasets(cfg.data, cfg.run.seed)
    xs, ys = zip(*(bundle.test[i] for i in range(len(bundle.test))))
    return torch.stack(xs).numpy(), np.asarray(ys)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (cfg, model folder, evaluation, test images, labels)."""
    out = {}
    for kind in CASES:
        d = tmp_path_factory.mktemp(kind)
        cfg, info, tables, ev = _trained(kind, d / "run")
        served.save_model(cfg, d / "run", info, tables, ev, d / "model")
        x, y = _test_images(cfg)
        out[kind] = (cfg, d / "model", ev, tables, x, y)
    return out


def _budgeted(folder: Path) -> served.Budgeted:
    return served.Budgeted.load(folder / "artifacts" / "model")


def test_early_exit_answer_is_the_budgeted_evaluation_at_that_budget(saved):
    cfg, folder, ev, _, x, y = saved["exit"]
    row = ev.budgeted[ev.budgeted["mode"] == "budget"].iloc[0]  # the requested 6 MMACs
    out = _budgeted(folder)(x, row["requested_budget"])
    assert 100 * np.mean(out["prediction"].to_numpy() == y) == pytest.approx(row["test_accuracy"], abs=1e-9)
    assert out["mmacs"].mean() * 1e6 == pytest.approx(row["test_cost"], rel=1e-9)
    fractions = out["output"].value_counts(normalize=True).reindex([f"exit{i + 1}" for i in range(len(row["exit_fraction"]))], fill_value=0)
    assert np.allclose(fractions.to_numpy(), row["exit_fraction"])
    # a budget that was not evaluated: solved on the held-out confidences, as the evaluation would
    b = 0.5 * (row["requested_budget"] + out["mmacs"].max() * 1e6)
    again = evaluation.budgeted(*_heldout_and_test(saved["exit"]), budgets=[b], p_grid=False).iloc[0]
    other = _budgeted(folder)(x, b)
    assert 100 * np.mean(other["prediction"].to_numpy() == y) == pytest.approx(again["test_accuracy"]) and other["mmacs"].mean() * 1e6 == pytest.approx(again["test_cost"])


def _heldout_and_test(case):
    _, _, _, tables, _, _ = case
    h, hl = evaluation.frame_to_predictions(tables.heldout, "heldout")
    t, tl = evaluation.frame_to_predictions(tables.test, "test")
    return h, hl, t, tl


def test_adn_answer_is_the_best_held_out_subnetwork_that_fits(saved):
    cfg, folder, ev, tables, x, y = saved["subnet"]
    h, hl, t, tl = _heldout_and_test(saved["subnet"])
    acc_h = (h.logits.argmax(-1) == hl).double().mean(1)
    costs = h.costs.tolist()
    for budget in (costs[0], costs[1] * 1.001, costs[-1]):
        fits = [i for i, c in enumerate(costs) if c <= budget]
        best = max(fits, key=lambda i: (acc_h[i].item(), -costs[i]))
        out = _budgeted(folder)(x, budget)
        assert set(out["output"]) == {h.names[best]} and np.all(out["mmacs"] * 1e6 == costs[best])
        assert np.array_equal(out["prediction"].to_numpy(), t.logits[best].argmax(-1).numpy())  # the evaluation's predictions of that sub-network
        assert 100 * np.mean(out["prediction"].to_numpy() == y) == pytest.approx(ev.anytime.set_index("name").loc[h.names[best], "accuracy"])


def test_dmnn_answer_reports_each_images_executed_cost(saved):
    cfg, folder, ev, tables, x, y = saved["gated"]
    _, _, t, tl = _heldout_and_test(saved["gated"])
    out = _budgeted(folder)(x)
    assert np.array_equal(out["prediction"].to_numpy(), t.logits.argmax(1).numpy())
    assert np.allclose(out["mmacs"].to_numpy() * 1e6, t.costs.numpy())
    assert set(len(p) for p in out["output"]) == {t.gates.shape[1]}  # one 0/1 per sub-block gate


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_budgets_and_images_get_one_message_each(saved, kind):
    cfg, folder, _, _, x, _ = saved[kind]
    model = _budgeted(folder)
    lo, hi = model.range
    for b in (lo * 0.5, hi * 2, float("nan")):
        with pytest.raises(ConfigError, match=r"'budget' = .*MACs per image within \["):
            model(x[:2], b)
    with pytest.raises(ConfigError, match=r"'images' = 'shape \(2, 3, 8, 8\)'.*\[N, 3, 32, 32\]"):
        model(np.zeros((2, 3, 8, 8), np.float32), hi)


FRESH = """
import json, sys, numpy as np, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
x = np.load(sys.argv[2])
out = model.predict(x, params={"budget": float(sys.argv[3])})
import dynlab
print(json.dumps({"pred": out["prediction"].tolist(), "mmacs": out["mmacs"].tolist(), "dynlab": dynlab.__file__}))
"""


@pytest.mark.slow
def test_a_logged_model_loads_in_a_fresh_process_from_its_own_code(saved, tmp_path):
    cfg, folder, ev, _, x, _ = saved["exit"]
    row = ev.budgeted[ev.budgeted["mode"] == "budget"].iloc[0]
    np.save(tmp_path / "x.npy", x[:64])
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(tmp_path / "x.npy"), str(row["requested_budget"])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["dynlab"]).resolve().is_relative_to(folder.resolve())  # the model's copy of the code, not this checkout's
    mine = _budgeted(folder)(x[:64], row["requested_budget"])
    assert got["pred"] == mine["prediction"].tolist() and np.allclose(got["mmacs"], mine["mmacs"])


def test_registered_model_gets_a_version_per_run(in_tmp):
    from mlflow import MlflowClient

    from dynlab import tracking

    uri = tracking.tracking_uri()
    client = MlflowClient(uri)
    exp = client.create_experiment("served")
    cfg, info, tables, ev = _trained("subnet", in_tmp / "run")
    cfg = cfg.with_overrides(["run.register_model=digits-adn"])
    ids = []
    for _ in range(2):
        run = client.create_run(exp)
        ids.append(served.log_model(tracking.RunHandle(uri, run.info.run_id, exp), cfg, in_tmp / "run", info, tables, ev))
    versions = sorted(client.search_model_versions("name='digits-adn'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2] and [v.source for v in versions] == [f"models:/{i}" for i in ids]
    assert versions[0].tags["dynlab.method"] == "adn" and versions[0].tags["dynlab.dataset"] == "digits" and float(versions[0].tags["dynlab.test_accuracy"]) >= 0
    logged = client.get_logged_model(ids[0])
    assert logged.source_run_id == client.get_model_version("digits-adn", "1").run_id and str(logged.status).endswith("READY")
    # the registered name resolves for inference; an unknown version is one message
    from pipelines import infer

    _digit_folder(in_tmp / "imgs", 8)
    assert infer.main(["model=models:/digits-adn/2", f"data.root={in_tmp / 'imgs'}", f"out={in_tmp / 'a.parquet'}"]) == 0
    assert infer.main(["model=models:/digits-adn/7", f"data.root={in_tmp / 'imgs'}", f"out={in_tmp / 'b.parquet'}"]) == 2


def _post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_budgeted_requests_over_rest(saved, tmp_path):
    """``mlflow models serve --env-manager local`` on 127.0.0.1: a budgeted request answers as the
    model does in-process; a budget outside the model's range is a 400 with our message."""
    import os
    import time
    import urllib.request

    cfg, folder, ev, _, x, _ = saved["subnet"]
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn beside this python
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (server.stderr.read() if server.poll() is not None else b"")[-2000:]
                time.sleep(0.5)
        model = _budgeted(folder)
        lo, hi = model.range
        status, body = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x[:4].tolist(), "params": {"budget": hi}})
        assert status == 200
        mine = model(x[:4], hi)
        assert [p["prediction"] for p in body["predictions"]] == mine["prediction"].tolist() and [p["output"] for p in body["predictions"]] == mine["output"].tolist()
        status, body = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x[:1].tolist(), "params": {"budget": lo / 2}})
        assert status == 400 and "'budget'" in body["message"] and "MACs per image within" in body["message"] and "Traceback" not in body["message"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _digit_folder(root: Path, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` digits test images as PNG files in folders named by class, and one image in
    no class folder; returns their [0, 1] pixels and labels."""
    from PIL import Image

    _, _, te_x, te_y = data._digits_arrays(32)
    for i in range(n):
        (root / str(int(te_y[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray((te_x[i, 0].numpy() * 255).round().astype(np.uint8)).save(root / str(int(te_y[i])) / f"{i:03d}.png")
    Image.fromarray((te_x[n, 0].numpy() * 255).round().astype(np.uint8)).save(root / "loose.png")
    return te_x[: n + 1].numpy(), te_y[: n + 1].numpy()


def test_infer_writes_predictions_of_every_image_with_the_accuracy_of_the_labelled_ones(saved, tmp_path, capsys):
    import pandas as pd

    from pipelines import infer

    cfg, folder, ev, _, x, _ = saved["exit"]
    pixels, labels = _digit_folder(tmp_path / "imgs")
    budget = float(ev.budgeted[ev.budgeted["mode"] == "budget"].iloc[0]["requested_budget"])
    assert infer.main([f"model={folder}", f"data.root={tmp_path / 'imgs'}", f"budget={budget}", f"out={tmp_path / 'out.parquet'}", "batch_size=16"]) == 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out.columns) == ["file", "label", "prediction", "class", "output", "mmacs"] and len(out) == 41
    by_file = out.set_index("file")
    assert by_file.loc["loose.png", "label"] == -1 and (by_file.drop("loose.png")["label"] >= 0).all()
    # read as evaluation reads digits (within the PNG's 8-bit rounding), and answered as the model answers those tensors
    from PIL import Image

    transform = data.eval_transform(cfg.data, 32)
    order = [f"{int(labels[i])}/{i:03d}.png" for i in range(40)]
    tensors = torch.stack([transform(Image.open(tmp_path / "imgs" / f)) for f in order])
    mean, std = float(data._digits_arrays(32)[0].mean()), float(data._digits_arrays(32)[0].std())
    assert torch.allclose(tensors, ((torch.from_numpy(pixels[:40]) - mean) / std).repeat(1, 3, 1, 1), atol=0.6 / 255 / std)
    mine = _budgeted(folder)(tensors.numpy(), budget)
    assert by_file.loc[order, "prediction"].tolist() == mine["prediction"].tolist() and by_file.loc[order, "label"].tolist() == labels[:40].tolist()
    acc = 100 * np.mean(mine["prediction"].to_numpy() == labels[:40])
    assert f"accuracy {acc:.2f}%" in capsys.readouterr().out
    # bad input: one message each, nothing written
    for args, message in (
        ([f"model={tmp_path / 'nope'}", f"data.root={tmp_path / 'imgs'}"], "'model' = "),
        ([f"model={folder}", f"data.root={tmp_path / 'none'}"], "'data.root' = "),
        ([f"model={folder}", f"data.root={tmp_path / 'imgs'}", "budget=1"], "'budget' = 1.0 is not allowed"),
        ([f"model={folder}", "colour=red"], "argument 'colour=red' is not allowed"),
    ):
        assert infer.main([*args, f"out={tmp_path / 'bad.parquet'}"]) == 2
        assert message in capsys.readouterr().out and not (tmp_path / "bad.parquet").exists()


def test_an_evaluated_run_shows_its_model_and_datasets_in_the_mlflow_ui(in_tmp):
    """What the MLflow UI's columns read: the run's logged model (Model), its dataset inputs
    (Dataset: training, held-out, test, one digest), and an experiment that opens in the
    model-training view."""
    from mlflow import MlflowClient

    from dynlab import tracking

    uri = tracking.tracking_uri()
    exp = tracking.experiment_id("ui")
    client = MlflowClient(uri)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    cfg, info, tables, ev = _trained("exit", in_tmp / "run")
    run = client.create_run(exp)
    steps.log_evaluation(tracking.RunHandle(uri, run.info.run_id, exp), cfg, tables, ev, str(in_tmp / "run"))
    got = client.get_run(run.info.run_id)
    (model,) = got.outputs.model_outputs
    assert client.get_logged_model(model.model_id).source_run_id == run.info.run_id
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"training", "held-out", "test"} and len({d.digest for d in inputs.values()}) == 1
    assert json.loads(inputs["held-out"].profile)["num_rows"] == 200 and json.loads(inputs["test"].profile)["num_rows"] == 500
    link = tracking.compare_link(["a", "b"], exp)
    assert link.startswith("http://127.0.0.1:5000/#/compare-runs?runs=") and "%5B%22a%22%2C%20%22b%22%5D" in link


def test_an_early_exit_model_without_a_held_out_split_answers_at_its_last_exit_only(tmp_path):
    cfg, info, tables, _ = _trained("exit", tmp_path / "run")
    cfg = cfg.with_overrides(["data.heldout=0", "eval.budgets=[]", "eval.num_budgets=0", "eval.p_grid=false"])
    tables = steps.predict(cfg, str(tmp_path / "run"))
    ev = steps.evaluate(cfg, tables)
    served.save_model(cfg, tmp_path / "run", info, tables, ev, tmp_path / "model")
    model = _budgeted(tmp_path / "model")
    lo, hi = model.range
    assert lo == hi == model.costs[-1].item()
    x, _ = _test_images(cfg)
    out = model(x[:16])
    assert set(out["output"]) == {"exit4"} and np.array_equal(out["prediction"].to_numpy(), evaluation.frame_to_predictions(tables.test, "test")[0].logits[-1, :16].argmax(1).numpy())
    with pytest.raises(ConfigError, match="'budget'"):
        model(x[:2], hi / 2)
