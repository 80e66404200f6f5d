"""Budgeted batch inference with a logged model over a folder or zip of images, into Parquet.

    python -m pipelines.infer model=models:/digits-boostnet/1 data.root=photos/ budget=6e6
    python -m pipelines.infer model=runs:/<run id>/model data.root=images.zip out=answers.parquet

Keys: ``model`` (an MLflow model URI: ``models:/NAME/VERSION``, ``models:/<model id>``, a folder),
``data.root`` (a folder or .zip; every image under it, in any sub-folders), ``budget`` (MACs per
image; default: the model's dearest output), ``out`` (default ``inference.parquet``),
``batch_size`` (default 64). Each image is read as the model's evaluation reads its dataset's
images; an image inside a folder named after one of the model's classes counts as that class, and
the accuracy over those is printed. The Parquet file has one row per image: ``file``, ``label``
(-1: none), ``prediction``, ``class`` (its name), ``output`` (the exit, sub-network or gate pattern
taken) and ``mmacs``; it is written whole or not at all.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

KEYS = {"model": "", "data.root": "", "budget": "", "out": "inference.parquet", "batch_size": "64"}


class InferError(Exception):
    pass


def parse(argv: list[str]) -> dict[str, str]:
    args = dict(KEYS)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise InferError(f"argument {a!r} is not allowed: expected key=value with a key among {', '.join(KEYS)}")
        args[key] = value
    for key in ("model", "data.root"):
        if not args[key]:
            raise InferError(f"'{key}' is required (see --help)")
    if not args["batch_size"].isdigit() or int(args["batch_size"]) < 1:
        raise InferError(f"'batch_size' = {args['batch_size']!r} is not allowed: expected a positive integer")
    return args


def image_files(root: str) -> tuple[Path, list[str]]:
    """(base folder, image paths relative to it): a folder's images, or a zip's, extracted once."""
    from dynlab import data

    path = Path(root).expanduser()
    if not path.exists():
        raise InferError(f"'data.root' = {root!r} is not allowed: expected an existing folder or .zip of images")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise InferError(f"'data.root' = {root!r} is not allowed: expected a folder or a .zip (this file is neither)")
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(data.IMG_EXTENSIONS) and not n.endswith("/") and "__MACOSX" not in n)
        return data.extract_zip(path, names), names
    names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in data.IMG_EXTENSIONS)
    return path, names


def load(uri: str):
    """The pyfunc model and our Budgeted inside it; an unknown URI is one message."""
    import mlflow.pyfunc

    from dynlab import tracking

    try:
        with tracking.mlflow_global_uri(tracking.tracking_uri()):  # models:/NAME/VERSION resolves in our store
            model = mlflow.pyfunc.load_model(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing model
        raise InferError(f"'model' = {uri!r} is not allowed: expected the URI of a logged dynlab model (models:/NAME/VERSION, models:/<model id>, runs:/<run id>/model or a folder); MLflow says: {str(err).splitlines()[0][:300]}") from None
    inner = model.unwrap_python_model()
    if not hasattr(inner, "budgeted"):
        raise InferError(f"'model' = {uri!r} is not allowed: it is not a dynlab model (no budgeted inference)")
    return model, inner.budgeted


def infer(args: dict[str, str]) -> pd.DataFrame:
    import torch
    from PIL import Image

    from dynlab import data
    from dynlab.errors import ConfigError

    model, budgeted = load(args["model"])
    try:
        budget = budgeted.check_budget(float(args["budget"]) if args["budget"] else None)
    except (ConfigError, ValueError) as err:
        raise InferError(str(err) if isinstance(err, ConfigError) else f"'budget' = {args['budget']!r} is not allowed: expected MACs per image (a number)") from None
    base, names = image_files(args["data.root"])
    if not names:
        raise InferError(f"'data.root' = {args['data.root']!r} is not allowed: it holds no images ({', '.join(data.IMG_EXTENSIONS)})")
    classes = budgeted.meta.get("classes", [])
    transform = data.eval_transform(budgeted.cfg.data, budgeted.meta["info"]["image_size"])
    bs, rows, start = int(args["batch_size"]), [], time.time()
    for i in range(0, len(names), bs):
        chunk = names[i : i + bs]
        x = torch.stack([transform(Image.open(base / n)) for n in chunk]).numpy()
        out = model.predict(x, params={"budget": budget})
        labels = [classes.index(Path(n).parent.name) if Path(n).parent.name in classes else -1 for n in chunk]
        rows.append(out.assign(file=chunk, label=labels))
        done = i + len(chunk)
        print(f"\r[infer] {done}/{len(names)} images ({100 * done / len(names):.0f}%), {done / max(time.time() - start, 1e-9):.0f} img/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    frame = pd.concat(rows, ignore_index=True)
    frame["class"] = [classes[p] if 0 <= p < len(classes) else str(p) for p in frame["prediction"]]
    return frame[["file", "label", "prediction", "class", "output", "mmacs"]]


def write(frame: pd.DataFrame, out: str) -> Path:
    """The Parquet file, whole or not at all (written beside it, then renamed)."""
    path = Path(out).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def summary(frame: pd.DataFrame) -> str:
    lines = [f"{len(frame)} images, {frame['mmacs'].mean():.3f} MMACs per image on average; outputs taken: " + ", ".join(f"{k} {v}" for k, v in frame["output"].value_counts().head(8).items())]
    labelled = frame[frame["label"] >= 0]
    if len(labelled):
        acc = 100 * float((labelled["prediction"] == labelled["label"]).mean())
        se = 100 * math.sqrt(acc / 100 * (1 - acc / 100) / len(labelled))
        lines.append(f"accuracy {acc:.2f}% ± {se:.2f} (binomial SE) on the {len(labelled)} images in folders named after the model's classes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse(argv)
        frame = infer(args)
        path = write(frame, args["out"])
    except InferError as err:
        print(f"error: {err}")
        return 2
    print(summary(frame))
    print(f"[dynlab] predictions: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
