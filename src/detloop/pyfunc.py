"""The stable import path of the model contract: ``detloop.pyfunc.DetectorModel``.

Every registered version's code (``serving_model.py``, logged with a copy of the package) imports it
from here, models registered by detloop 0.1 included. A process that imported detloop already
(``detloop serve``, the gate, a notebook) resolves it against the installed package; a fresh process
against the model's own copy. The contract itself lives in :mod:`detloop.model.pyfunc`.
"""

from detloop.model.pyfunc import DetectorModel

__all__ = ["DetectorModel"]
