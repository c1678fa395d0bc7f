"""Python client for a running Ladder server (`ladder serve`).

The routes mirror the OpenAI fine-tuning API, so the client stays a thin layer: it returns the
server's JSON objects as plain dicts and turns every failure - an error body, an unexpected
status, an unreachable server - into one `LadderAPIError` that callers can report in one line.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("ladder.client")

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class LadderAPIError(Exception):
    """A request that did not succeed. `status` is None when no HTTP response came back."""

    def __init__(self, status: int | None, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def __str__(self) -> str:
        head = f"HTTP {self.status} {self.code}" if self.status is not None else self.code
        tail = f" (param: {self.param})" if self.param else ""
        return f"{head}: {self.message}{tail}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> LadderAPIError:
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "message" in error:
            return cls(
                response.status_code,
                str(error.get("code") or "error"),
                str(error["message"]),
                error.get("param"),
            )
        # Not Ladder's error shape (a proxy page, a bare framework error): keep what we can, on
        # one line, so the CLI can still print a single readable sentence.
        code = response.reason_phrase.lower().replace(" ", "_") or f"http_{response.status_code}"
        detail = body.get("detail") if isinstance(body, dict) else None
        text = json.dumps(detail) if detail is not None else response.text
        message = " ".join(text.split())[:300] or response.reason_phrase or "no response body"
        return cls(response.status_code, code, message)


class LadderConnectionError(LadderAPIError, ConnectionError):
    """The server could not be reached at all."""


class LadderTimeoutError(LadderAPIError, TimeoutError):
    """`wait` gave up before the job reached a terminal status."""


# Statuses that say the request was not carried out and may succeed later: too many requests,
# a proxy that found no live server, a server unavailable or a gateway timeout. (A 500 is the
# server's own error, usually the same on a retry; a read timeout means it is still working.)
RETRIED = frozenset({429, 502, 503, 504})
# Failures before any request reached a server: safe to send again.
RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def _ladder_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before retry `attempt` (0-based): the server's Retry-After if it gave one (up to
    30 s), else 0.5 s doubling, up to 8 s."""
    try:
        if retry_after is not None:
            return min(max(float(retry_after), 0.0), 30.0)
    except ValueError:
        pass
    return min(0.5 * 2**attempt, 8.0)


class LadderClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
    ):
        self.base_url = (base_url or os.environ.get("LADDER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LADDER_API_KEY")
        # A caller-supplied client (FastAPI's TestClient, a MockTransport) belongs to the caller:
        # it keeps its own timeouts (TestClient warns on per-request ones) and is not closed here.
        # Requests that are safe to repeat (reads and predictions) are retried this many times
        # when the server cannot be reached or answers 429 / 502 / 503 / 504 (a replica
        # restarting, a queue full), with exponential backoff or the server's Retry-After.
        self.max_retries = max_retries
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        # Events may be minutes apart while a job trains, so a stream only time-limits connecting.
        self._stream_kwargs: dict[str, Any] = (
            {"timeout": httpx.Timeout(timeout, read=None)} if self._owns_http else {}
        )

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> LadderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _unreachable(self, exc: httpx.TransportError) -> LadderConnectionError:
        return LadderConnectionError(
            None,
            "connection_error",
            f"cannot reach the Ladder server at {self.base_url} ({exc.__class__.__name__}: {exc}); "
            f"start it with `ladder serve` or pass --url (or set LADDER_URL)",
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = self.base_url + path
        repeatable = method == "GET" or path == "/v1/predict"
        for attempt in range(self.max_retries + 1 if repeatable else 1):
            last = attempt == self.max_retries or not repeatable
            log.debug("%s %s", method, url)
            try:
                response = self._http.request(method, url, headers=self._headers(), **kwargs)
            except httpx.TransportError as exc:
                if last or not isinstance(exc, RETRIED_ERRORS):
                    raise self._unreachable(exc) from exc
                log.info("%s %s: %s; retrying", method, path, exc.__class__.__name__)
                time.sleep(_backoff(attempt, None))
                continue
            if not last and (
                response.status_code in RETRIED
                # A 500 that is not Ladder's error object came from a proxy in front of it
                # (Ray Serve answers so for a request whose replica died): not the server's
                # own verdict on the request.
                or (response.status_code == 500 and not _ladder_error(response))
            ):
                log.info("%s %s: HTTP %d; retrying", method, path, response.status_code)
                time.sleep(_backoff(attempt, response.headers.get("retry-after")))
                continue
            if not response.is_success:
                raise LadderAPIError.from_response(response)
            return response.json()
        raise AssertionError("unreachable")

    # -- files -----------------------------------------------------------------------------

    def upload_file(self, path: str | os.PathLike[str]) -> dict:
        path = Path(path)
        if not path.is_file():
            raise LadderAPIError(None, "file_not_found", f"no such local file: {path}", "file")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as fh:
            return self._request(
                "POST",
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": (path.name, fh, content_type)},
            )

    def list_files(self, page_size: int = 100) -> list[dict]:
        """Every uploaded file, newest first, fetched page by page."""
        return list(self._pages("/v1/files", page_size))

    def get_file(self, file_id: str) -> dict:
        return self._request("GET", f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> dict:
        """Delete an upload (409 `file_in_use` while a queued or running job uses it)."""
        return self._request("DELETE", f"/v1/files/{file_id}")

    # -- jobs ------------------------------------------------------------------------------

    def _file_id(self, file_or_path: str) -> str:
        """An id passes through; an existing local path is uploaded first so callers can hand
        over whichever they have."""
        if Path(file_or_path).is_file():
            uploaded = self.upload_file(file_or_path)
            log.info("uploaded %s as %s", file_or_path, uploaded["id"])
            return uploaded["id"]
        return file_or_path

    def create_job(
        self,
        model: str,
        training_file: str,
        *,
        validation_file: str | None = None,
        seed: int | None = None,
        suffix: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
    ) -> dict:
        body: dict[str, Any] = {
            "model": model,
            "training_file": self._file_id(training_file),
            "validation_file": self._file_id(validation_file) if validation_file else None,
            "seed": seed,
            "suffix": suffix,
        }
        # Left out rather than sent empty so the server's defaults stay the single source.
        if hyperparameters:
            body["hyperparameters"] = hyperparameters
        return self._request("POST", "/v1/fine_tuning/jobs", json=body)

    def list_jobs(self, limit: int = 20, after: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._request("GET", "/v1/fine_tuning/jobs", params=params)

    def iter_jobs(self, page_size: int = 100) -> Iterator[dict]:
        """Every job, newest first, page by page."""
        return self._pages("/v1/fine_tuning/jobs", page_size)

    def _pages(self, path: str, page_size: int = 100) -> Iterator[dict]:
        """Every item of a paged list, following the `after` cursor."""
        after = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after"] = after
            page = self._request("GET", path, params=params)
            yield from page["data"]
            # An empty page that still claims more would loop forever; trust the data instead.
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def get_job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def list_events(self, job_id: str, after: str | None = None, limit: int = 100) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)

    def stream_events(self, job_id: str) -> Iterator[dict]:
        """Events as the server emits them, until it sends `[DONE]` (the job is terminal)."""
        url = f"{self.base_url}/v1/fine_tuning/jobs/{job_id}/events"
        try:
            with self._http.stream(
                "GET",
                url,
                params={"stream": "true"},
                headers=self._headers(),
                **self._stream_kwargs,
            ) as response:
                if not response.is_success:
                    response.read()
                    raise LadderAPIError.from_response(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
        """Poll until the job is succeeded, failed or cancelled; return that final job."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_status = None
        while True:
            job = self.get_job(job_id)
            if job["status"] != last_status:
                log.info("job %s: %s", job_id, job["status"])
                last_status = job["status"]
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise LadderTimeoutError(
                    None,
                    "timeout",
                    f"job {job_id} still {job['status']} after {timeout_s:g}s",
                    "timeout_s",
                )
            time.sleep(poll_s)

    # -- models and inference --------------------------------------------------------------

    def list_models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["data"]

    def delete_model(self, model_id: str) -> dict:
        return self._request("DELETE", f"/v1/models/{model_id}")

    def predict(self, model: str | list[str], inputs: list[str]) -> dict:
        return self._request("POST", "/v1/predict", json={"model": model, "inputs": inputs})


def _parse_sse(lines: Iterator[str]) -> Iterator[dict]:
    """Decode `data:` lines into events; a blank line ends an event, `[DONE]` ends the stream.
    Comment lines (keep-alives) and other fields (`event:`, `id:`) carry nothing we use."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:
            continue
        payload = "\n".join(data)
        data = []
        if payload == "[DONE]":
            return
        yield json.loads(payload)
    # Reaching here means the connection closed before the job was terminal (server restart,
    # proxy timeout); the caller sees the stream end, so say why.
    log.warning("event stream closed before [DONE]; the job may still be running")
