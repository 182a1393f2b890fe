"""CI's rule on skips, as a pytest plugin: under CRITLOOP_NO_SKIPS=1 (set by .ci/run) a skipped
test fails the run and is listed with its reason, unless the reason starts with MACHINE_LIMIT:
something the machine itself cannot provide, which no install step can fix. Expected failures
(xfail) are not skips."""

from __future__ import annotations

import os

import pytest

MACHINE_LIMIT = "machine limit: "


def _no_skips() -> bool:
    return os.environ.get("CRITLOOP_NO_SKIPS") == "1"


_skipped: list[tuple[str, str]] = []


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(MACHINE_LIMIT):
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _no_skips() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _no_skips() and _skipped:
        terminalreporter.section("skipped tests fail this run (CRITLOOP_NO_SKIPS=1)", red=True)
        for nodeid, reason in _skipped:
            terminalreporter.line(f"{nodeid}: {reason}")
