"""MLflow "models from code" entry point for the sanshi-ml pyfunc model.

MLflow copies this file into every logged model and executes it when the model is loaded; the package never imports
it. Logging the wrapper as code rather than as a cloudpickled object keeps python_model.pkl out of the model (the
only pickle left is model.joblib, which sanshi_ml.artifacts.load_model checks and unpickles through its
allow-list).
"""

from mlflow.models import set_model

from sanshi_ml.pyfunc import SanshiTriageModel

set_model(SanshiTriageModel())
