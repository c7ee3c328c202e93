"""MLflow: stage runs, the Model Registry (aliases, audit trail) and promotion / rollback."""
