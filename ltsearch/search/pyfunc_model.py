"""The pyfunc model's code, logged with it as MLflow's models-from-code asks (no pickled
object): loading the model runs this file, which names the class that serves it."""
import mlflow.models

from ltsearch.search.registry import ImageClassifier

mlflow.models.set_model(ImageClassifier())
