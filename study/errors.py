"""Every error a study reports to its user: one base class, one subclass per kind.

A :class:`StudyError` is something the user can fix. Its message names the
file, subject or key and says what to do; the command line prints it as one
line (``error: ...``) and exits with 2, and nothing already computed is lost.
Any other exception is a bug of the study and keeps its traceback. Each kind
also derives from the builtin exception a library caller would catch (a bad
config is a ``ValueError``, an unwritable file an ``OSError``).
"""

from __future__ import annotations


class StudyError(Exception):
    """A study that cannot start or go on; the message says why and what to do."""


class ConfigError(StudyError, ValueError):
    """A study config that cannot be used; the message says which key and why."""


class CohortError(StudyError, ValueError):
    """A cohort that cannot be used at all (no table, no subject column, ...)."""


class LayoutError(CohortError):
    """A cohort folder whose layout cannot be read as configured; the message names the key to set."""


class VolumeError(StudyError, ValueError):
    """An image that cannot be used; the message says what is wrong and how to fix it."""


class AttributionError(StudyError, ValueError):
    """A model that a method cannot explain; the message says why."""


class RayStartError(StudyError, RuntimeError):
    """Ray could not be started or joined; the message says what to do."""


class TrackingError(StudyError, RuntimeError):
    """MLflow cannot be used (server unreachable, bad URI); the message says what to do."""


class WriteError(StudyError, OSError):
    """A file the study could not write (a full disk, an unwritable folder); nothing half-written was left."""


class UntrustedCodeError(StudyError, PermissionError):
    """A model that can be loaded only by running code it names; the message says which and how to allow it."""


class ModelNotFoundError(StudyError, LookupError):
    """No study model under the name or URI given; the message lists what there is."""
