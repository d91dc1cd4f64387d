"""Datasets: ``dataset=NAME`` configs resolve through :mod:`.registry`.

Importing this package registers every dataset (:mod:`.shapes`, the synthetic ones; :mod:`.vision`,
the paper's ten and ImageNet; :mod:`.image_folder`, your own folders); a broken import surfaces as what it is, never
as an "unknown dataset".

Data problems raise a :class:`~.errors.DatasetError` (see :mod:`.errors`); data
fingerprints for cache keys come from :func:`~.integrity.fingerprint`.
"""
from .errors import (BadImageError, ClassesMissingFromTrainError, DatasetError,  # noqa: F401
                     EmptySplitError, TooFewClassesError)
from . import image_folder, shapes, vision  # noqa: F401,E402  (register the datasets)
