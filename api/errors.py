"""The service's error shape, `{"error": {"code", "message", "param"}}`, how an error raised
below the API is worded for it, and id checks."""

from __future__ import annotations

import re

from api.hyperparameters import http_name

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:_.-]{0,127}$"  # no slashes, no "..": ids never become paths


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "param": param}}


# An upload's columns are named text, label and (optionally) text_pair, and its text is UTF-8:
# where the command line passes another data option, an upload changes the file.
UPLOAD_FIXES = {
    "load_dataset.text_column": "if another column holds the texts, rename it to 'text'",
    "load_dataset.label_column": "if another column holds the labels, rename it to 'label'",
    "load_dataset.text_pair_column": (
        "if another column holds the second texts, rename it to 'text_pair'"
    ),
    "load_dataset.encoding": "re-save it as UTF-8",
}


def http_field(exc: Exception) -> str | None:
    """The request field whose change fixes `exc` ("hyperparameters.kept_layers"), where the
    setting it names (FixableError.setting) is one of a job's hyperparameters; else None."""
    setting = getattr(exc, "setting", None)
    name = http_name(setting) if setting else None
    return f"hyperparameters.{name}" if name else None


def http_message(exc: Exception) -> str:
    """`exc`'s one-line message in the service's words: a setting is named by its request
    field, an upload's data option by what to change in the file; never a command-line flag."""
    setting = getattr(exc, "setting", None)
    if setting is None:
        return str(exc)
    if setting in UPLOAD_FIXES:
        return exc.render(setting.rpartition(".")[2], UPLOAD_FIXES[setting])
    return exc.render(http_field(exc) or setting.rpartition(".")[2])


def require_id(value: str, param: str) -> str:
    if not re.match(ID_PATTERN, value) or ".." in value:
        raise APIError(400, "invalid_id", f"{param} {value!r} is not a valid id", param)
    return value
