"""Training runs: a YOLO model trained on a data set inside one MLflow run, registered as a version."""
