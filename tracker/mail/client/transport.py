"""The client over httpx: one connection's settings, each call encoded and its answer
decoded (a failure as a `TrackerError`), and the sync and async drivers of operations.

`operation` makes a method of an operation (a generator of `Call`s, calls.py): on a
`SyncTransport` it is a function that runs it to its result, on an `AsyncTransport` a
coroutine function; the method's parameters and documentation are the operation's.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, overload

import httpx
import orjson

from tracker import __version__
from tracker.mail.client.calls import Call, Op, T
from tracker.mail.client.errors import (
    AuthenticationError,
    Forbidden,
    InvalidRequest,
    ItemError,
    NotFound,
    TrackerError,
    Unavailable,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0

P = ParamSpec("P")


def _request(call: Call) -> dict[str, Any]:
    """httpx.request keyword arguments for `call`."""
    try:
        # orjson: several times faster than json for a batch of a thousand HTML documents.
        content = orjson.dumps(call.body) if call.body is not None else None
    except TypeError as exc:  # a str with lone surrogates, for instance
        raise InvalidRequest(f"the request cannot be encoded as JSON: {exc}") from None
    headers = {"content-type": "application/json"} if content is not None else None
    return {"method": call.method, "url": call.path, "content": content, "headers": headers,
            "params": call.params}


def _answer(response: httpx.Response) -> Any:
    """The decoded JSON of a successful answer, or the TrackerError it stands for."""
    status = response.status_code
    if 200 <= status < 300:
        if status == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith(("text/csv",
                                                                 "application/jsonl")):
            return response.content  # an export: the bytes as they came
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise TrackerError("the server's answer is not JSON", status) from None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error: str = body["error"]
    else:  # not tracker's answer: a proxy's error page, say
        error = response.reason_phrase or f"HTTP {status}"
    if status == 401:
        raise AuthenticationError(error, status)
    if status == 403:
        raise Forbidden(error, status)
    if status == 404:
        raise NotFound(error, status)
    if status in (400, 413, 422):
        items = body.get("errors") if isinstance(body, dict) else None
        errors = [ItemError(int(e["index"]), str(e["error"])) for e in items
                  if isinstance(e, dict) and "index" in e] if isinstance(items, list) else []
        raise InvalidRequest(error, status, errors)
    if status in (502, 503, 504):
        raise Unavailable(error, status, _retry_after(response))
    raise TrackerError(error, status)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date (the server never sends one)
        return None


def _unavailable(exc: httpx.TransportError) -> Unavailable:
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(f"the tracker API timed out ({type(exc).__name__})")
    return Unavailable(f"cannot reach the tracker API: {exc or type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class _Done(Generic[T]):
    value: T


def _step(op: Op[T], outcome: httpx.Response | TrackerError | None) -> Call | _Done[T]:
    """Advance `op` with the outcome of its last call (None to start it): its next call, or
    its result. A failed call is thrown into the operation, which may add to the error."""
    try:
        if isinstance(outcome, httpx.Response):
            try:
                answer = _answer(outcome)
            except TrackerError as exc:
                outcome = exc
            else:
                return op.send(answer)
        if isinstance(outcome, TrackerError):
            return op.throw(outcome)
        return op.send(None)
    except StopIteration as stop:
        return _Done(stop.value)
    except (KeyError, TypeError, ValueError) as exc:  # an answer of an unexpected shape
        raise TrackerError(f"unexpected answer from the server: {exc!r}") from None


class Connection:
    """What both transports share: the API's address, the key, the connection's options."""

    def __init__(self, base_url: str, api_key: str, timeout: float | httpx.Timeout) -> None:
        if not api_key:
            raise TrackerError("an API key is required (TRACKER_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self._options: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": {"authorization": f"Bearer {api_key}",
                        "user-agent": f"tracker-client/{__version__}",
                        "accept": "application/json"},
            "timeout": timeout,
            # The API never redirects; following one would send the key elsewhere.
            "follow_redirects": False,
        }

    @classmethod
    def from_env(cls, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> Self:
        """From TRACKER_API_URL (default http://127.0.0.1:8000) and TRACKER_API_KEY."""
        return cls(os.environ.get("TRACKER_API_URL") or DEFAULT_URL,
                   os.environ.get("TRACKER_API_KEY", ""), timeout)



class SyncTransport(Connection):
    """Runs operations over a synchronous connection pool. Use as a context manager or
    call close()."""

    def __init__(self, base_url: str, api_key: str,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(**self._options)

    def _run(self, op: Op[T]) -> T:
        step = _step(op, None)
        while isinstance(step, Call):
            outcome: httpx.Response | TrackerError
            try:
                outcome = self._http.request(**_request(step))
            except httpx.TransportError as exc:
                outcome = _unavailable(exc)
            except TrackerError as exc:
                outcome = exc
            step = _step(op, outcome)
        return step.value

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncTransport(Connection):
    """Runs operations over an asynchronous connection pool. Use as an async context
    manager or await aclose()."""

    def __init__(self, base_url: str, api_key: str,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(**self._options)

    async def _run(self, op: Op[T]) -> T:
        step = _step(op, None)
        while isinstance(step, Call):
            outcome: httpx.Response | TrackerError
            try:
                outcome = await self._http.request(**_request(step))
            except httpx.TransportError as exc:
                outcome = _unavailable(exc)
            except TrackerError as exc:
                outcome = exc
            step = _step(op, outcome)
        return step.value

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class operation(Generic[P, T]):  # lower case: a decorator, as property is
    """Makes one method of an operation for Client and AsyncClient at once. The function
    it decorates takes the method's arguments and returns the operation: it is a generator
    itself, or a plain function that checks its arguments first (an error there reaches
    the caller as it is; inside the operation it would pass for an unexpected answer).
    Read on a SyncTransport, the method runs the operation to its result; read on an
    AsyncTransport, it is a coroutine function that does."""

    def __init__(self, build: Callable[Concatenate[Any, P], Op[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__
        self._name = build.__name__
        # What help() shows: the method's parameters, without `self` or the Op it returns.
        signature = inspect.signature(build)
        self._signature = signature.replace(
            parameters=list(signature.parameters.values())[1:],
            return_annotation=inspect.Signature.empty)

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(self, client: SyncTransport,
                owner: type[Any] | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(self, client: AsyncTransport,
                owner: type[Any] | None = None) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, client: Any, owner: type[Any] | None = None) -> Any:
        if client is None:
            return self
        build = self._build

        def run(*args: Any, **kwargs: Any) -> Any:
            return client._run(build(client, *args, **kwargs))

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            return await client._run(build(client, *args, **kwargs))

        method: Any = run_async if isinstance(client, AsyncTransport) else run
        method.__name__, method.__doc__ = self._name, self.__doc__
        method.__qualname__ = f"{type(client).__qualname__}.{self._name}"
        method.__signature__ = self._signature
        return method
