"""Errors a user can act on.

Every error raised on purpose by the core derives from WorkbenchError and carries a message meant for a person:
the UI shows it as is, the API maps it to an OpenAI error object, the CLI prints it to stderr.
"""
from __future__ import annotations


class WorkbenchError(Exception):
    """Base class: `str(error)` is the message to show."""

    #: OpenAI-style error type and HTTP status the API uses for this error.
    error_type = "invalid_request_error"
    status_code = 400


class ConfigError(WorkbenchError):
    """A settings file, flag, preset or option holds a bad key or value."""


class PathError(WorkbenchError):
    """A user-supplied name would leave its folder, or names nothing."""


class ModelLoadError(WorkbenchError):
    """A model could not be loaded; nothing was left half-loaded."""


class NoModelLoaded(WorkbenchError):
    error_type = "server_error"
    status_code = 503


class ModelNotFound(WorkbenchError):
    error_type = "invalid_request_error"
    status_code = 404


class UnsupportedParameter(WorkbenchError):
    """A generation knob was set that the loaded loader cannot honour."""


class GenerationError(WorkbenchError):
    error_type = "server_error"
    status_code = 500


class BusyError(WorkbenchError):
    """The model manager refused work (for example a swap while a request runs)."""

    error_type = "server_error"
    status_code = 409
