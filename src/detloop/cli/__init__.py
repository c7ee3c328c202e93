"""The ``detloop`` console script: one module per command family."""
