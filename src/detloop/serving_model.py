"""Model-from-code entry for MLflow: a registered model is this file plus a copy of the detloop package.

It names ``detloop.pyfunc``, the import path every registered version uses (0.1 and later), so that a
process which loaded one version's copy of detloop can load any other version.
"""

from mlflow.models import set_model

from detloop.pyfunc import DetectorModel

set_model(DetectorModel())
