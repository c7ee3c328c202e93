"""The detector itself: Ultralytics loading (offline) and the MLflow pyfunc model contract."""
