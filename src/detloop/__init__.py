"""detloop: keep a production YOLO detector improving from reported failures without forgetting."""

from detloop.core.env import prepare_environment

__version__ = "0.1.0"

prepare_environment()
