"""Stop-string matching shared by every backend, so they all cut text the same way."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any stop string in ``text[start:]``: (index, stop string).

    At equal positions the longer stop wins (it is the more specific match).
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (
            best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1]))
        ):
            best = (index, stop)
    return best


def cut_at_stop(text: str, stops: Sequence[str], *, include: bool) -> tuple[str, str | None]:
    """``text`` cut at its first stop string (kept at the end if ``include``), and that string."""
    found = find_stop(text, stops)
    if found is None:
        return text, None
    index, stop = found
    return text[: index + len(stop)] if include else text[:index], stop
