"""The budgeted-inference pyfunc as MLflow's models-from-code file: a logged model runs this file
(``mlflow.models.set_model``) instead of unpickling an object."""

import mlflow.models

from dynlab.served import pyfunc_class

mlflow.models.set_model(pyfunc_class()())
