"""The local team stack and its roles: PostgreSQL, an S3 server, an MLflow server with basic auth, SLURM.

``detloop team up`` starts the services (each a process tracked by pid, in its own session) and writes
``stack.json`` and ``env.sh`` into the stack's state folder; ``detloop team down`` stops them. Roles
(reader, trainer, reviewer) map to MLflow permissions on the project's experiments and registered model.
"""
