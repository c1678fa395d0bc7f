"""The service's error shape, `{"error": {"code", "message", "param"}}`, and id checks."""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:_.-]{0,127}$"  # no slashes, no "..": ids never become paths


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "param": param}}


def require_id(value: str, param: str) -> str:
    if not re.match(ID_PATTERN, value) or ".." in value:
        raise APIError(400, "invalid_id", f"{param} {value!r} is not a valid id", param)
    return value
