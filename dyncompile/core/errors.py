"""Errors dyncompile raises on top of ValueError for bad arguments."""

from __future__ import annotations

import re
import traceback


class TraceError(RuntimeError):
    """The model could not be traced; the message says where in the user's code."""


_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


_RESUME = re.compile(r"^torch_dynamo_resume_in_(\w+?)_at_\d+$")


def user_frame(exc: BaseException) -> str:
    """The innermost frame of the user's code that dynamo was tracing when it failed."""
    found = _FILE_LINE.findall(str(exc))
    for fname, line, func in reversed(found):
        if "/torch/" not in fname.replace("\\", "/"):
            func = _RESUME.sub(r"\1", func)
            return f"{fname}:{line} in {func}"
    frames = list(getattr(exc, "real_stack", None) or [])
    if not frames:
        frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    for f in reversed(frames):
        fname = f.filename.replace("\\", "/")
        if "/torch/" in fname or "/dyncompile/" in fname:
            continue
        return f"{f.filename}:{f.lineno} in {f.name}"
    return "unknown location"


def trace_error(model: object, exc: BaseException) -> TraceError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    where = user_frame(exc)
    return TraceError(
        f"dyncompile could not trace {type(model).__name__}: {type(exc).__name__}: {first}\n"
        f"  at {where}\n"
        "  (the original error is chained below; TORCHDYNAMO_VERBOSE=1 shows dynamo's stack)"
    )
