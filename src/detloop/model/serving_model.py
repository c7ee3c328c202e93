"""Model-from-code entry for MLflow: the logged model is this file plus the detloop package."""

from mlflow.models import set_model

from detloop.model.pyfunc import DetectorModel

set_model(DetectorModel())
