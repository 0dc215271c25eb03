"""A trained model in MLflow: logged as a ``pyfunc`` model with its run's params and metrics,
and registered as a new version of a named model, tagged with the search, trial and config
hash it came from.

The pyfunc model takes a DataFrame whose rows each give one image: ``path`` (a file where the
model runs), ``image`` (an image file's bytes; base64 in a served request's JSON) or ``pixels``
(an array (H, W, C) of 0–255 values, any size, resized as files are). It gives each row's class
probabilities, a column per class name: what ``ltsearch predict`` gives, through the same
:class:`ltsearch.inference.TrainedModel`.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from ltsearch.search.tracking import TAG_SEARCH, TAG_TRIAL, _log_params, experiment_id, prepare_environment

TAG_CONFIG = "ltsearch.config_sha256"
ARTIFACT = "ltsearch_model"  # the saved model folder among the pyfunc model's artifacts
CODE = Path(__file__).with_name("pyfunc_model.py")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour of a saved model (``load_context`` loads it on the best device)."""

    def load_context(self, context):
        from ltsearch.inference import TrainedModel

        self.model = TrainedModel(context.artifacts[ARTIFACT], "auto")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return probabilities_frame(self.model, model_input)


def _images(model, model_input) -> np.ndarray:
    """Stored-size uint8 images of a pyfunc input's rows."""
    from PIL import Image

    from ltsearch.data.sources import DataError, conform, stored_mode

    columns = set(model_input.columns)
    if not columns & {"path", "image", "pixels"}:
        raise DataError(f"an input with columns {sorted(columns)}: expected 'path' (image files), "
                        "'image' (their bytes) or 'pixels' (arrays)")
    out = []
    for n, row in enumerate(model_input.to_dict("records")):
        data, path, pixels = row.get("image"), row.get("path"), row.get("pixels")
        if pixels is not None and len(pixels):
            out.append(model.from_array(np.asarray(pixels.tolist() if hasattr(pixels, "tolist") else pixels)))
        elif isinstance(data, (bytes, bytearray)) and data:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    out.append(conform(im, tuple(model.stored[1:]), stored_mode(model.stored)))
            except (OSError, ValueError) as e:
                raise DataError(f"row {n}: its image bytes are not an image ({e})") from None
        elif isinstance(path, str) and path:
            out.append(model.read(path))
        else:
            raise DataError(f"row {n}: no path, image bytes or pixels")
    return np.stack(out)


def probabilities_frame(model, model_input):
    return pd.DataFrame(model.probabilities(_images(model, model_input)), columns=model.classes)


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    pixels = Array(Array(Array("long")))  # (H, W, C) values 0–255 (a grey image: C = 1)
    return ModelSignature(
        inputs=Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False),
                       ColSpec(pixels, "pixels", required=False)]),
        outputs=Schema([ColSpec("double", name) for name in classes]))


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "config.yaml").read_bytes()).hexdigest()


def requirements() -> list[str]:
    """What the served model imports, at this environment's versions (and ltsearch itself:
    its pyfunc class lives there)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("ltsearch", "torch", "torchvision", "numpy", "pillow", "pyyaml", "safetensors",
                 "timm", "open-clip-torch", "pandas"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_model(folder: Path, uri: str, experiment: str, *, register: str | None = None,
              run_name: str | None = None, params: dict | None = None, metrics: dict | None = None,
              origin: dict | None = None) -> dict:
    """Log the saved model ``folder`` in a new run of ``experiment`` (with ``params`` and
    ``metrics``) and, with ``register``, as a new version of that registered model. Returns
    the run id, the model's URI and the version (or None)."""
    import json

    import mlflow

    prepare_environment()
    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text())
    tags = {TAG_CONFIG: config_sha256(folder), **{k: str(v) for k, v in (origin or {}).items() if v}}
    exp = experiment_id(uri, experiment)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        _log_params(client, run.info.run_id, params or {})
        numbers = {k: float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
        if numbers:
            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in numbers.items()})
        with warnings.catch_warnings():  # advice for models without a signature: this has one
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(name="model", python_model=str(CODE),
                                           artifacts={ARTIFACT: str(folder)},
                                           signature=signature(meta["classes"]),
                                           pip_requirements=requirements())
    version = None
    if register:
        mv = mlflow.register_model(info.model_uri, register, tags=tags)
        version = mv.version
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "version": version}


def register_confirmed(records, settings, uri: str, experiment: str, name: str) -> dict:
    """Register the confirmed best config's model: of its confirmation runs (fresh seeds), the
    one that scored best, tagged with the search, the trial confirmed and the seed."""
    from ltsearch.config import ConfigError
    from ltsearch.search.kept import kept_model
    from ltsearch.search.records import CONFIRM_OF, SEED, flatten

    metric, mode = settings.metric, settings.mode
    confirmed = records.confirmed(metric, mode)
    if not confirmed:
        raise ConfigError("--register", "no confirmation run ended: nothing to register")
    best = confirmed[0]
    runs = [r for r in records.trials.values() if r.get(CONFIRM_OF) == best["trial_id"]
            and r["status"] == "COMPLETED" and kept_model(records, r["trial_id"]) is not None]
    if not runs:
        raise ConfigError("--register", f"the confirmed best ({best['trial_id']}) has no kept model: its "
                                        "runs ended before --register asked for one (confirm with more seeds)")
    run = sorted(runs, key=lambda r: r["metrics"][metric], reverse=(mode == "max"))[0]
    folder = records.path.parent
    return log_model(kept_model(records, run["trial_id"]), uri, experiment, register=name,
                     run_name=f"{best['method']} (confirmed, seed {run[SEED]})",
                     params=flatten(run["config"]),
                     metrics={**{k: v for k, v in run["metrics"].items() if "/" in k},
                              f"confirmed/{metric}/mean": best["mean"], f"confirmed/{metric}/std": best["std"]},
                     origin={TAG_SEARCH: str(folder.resolve()), TAG_TRIAL: best["trial_id"],
                             "ltsearch.seed": run[SEED], "ltsearch.confirmation_trial": run["trial_id"]})


__all__ = ["ImageClassifier", "log_model", "TAG_CONFIG", "TAG_SEARCH", "TAG_TRIAL"]
