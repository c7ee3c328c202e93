"""The import path that models registered by detloop 0.1 name in their code: ``detloop.pyfunc.DetectorModel``.

Such a model carries its own copy of the package, but a process that has imported detloop already
(``detloop serve``, the gate, a notebook) resolves ``detloop.pyfunc`` against the installed package.
The model contract itself lives in :mod:`detloop.model.pyfunc`.
"""

from detloop.model.pyfunc import DetectorModel

__all__ = ["DetectorModel"]
