"""Config (Hydra compose, project paths), errors and exit codes, the process environment, the stage entry point."""
