"""``critloop view``: one self-contained HTML page to browse results, problem by problem.

The page holds everything inline (CSS, JavaScript, the plots as base64 PNG) and loads nothing
from the network, so it opens from disk (``file://``) and can be mailed around. It reads a batch
or Best-of-N results file (JSONL, one record per problem) or one ``critloop solve --json`` result.

Model text is untrusted: the page carries the records as JSON in a
``<script type="application/json">`` block, with every ``<`` written ``\\u003c`` so that no text
can end the block, and its script renders them with ``textContent`` only. Each problem's detail
is built when it is opened, so that a page of thousands of problems stays light.

Example:
    >>> page = write_view("runs/results.jsonl")  # doctest: +SKIP
    >>> page  # doctest: +SKIP
    PosixPath('runs/results.html')
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from critloop.errors import ConfigError
from critloop.graphs.report import (
    ROLES,
    BatchSummary,
    RewardStats,
    _accuracy_figure,
    _rewards,
    _rewards_figure,
    summarize,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "make_server",
    "plot_images",
    "read_results",
    "render_view",
    "word_diff",
    "write_view",
]


# --------------------------------------------------------------------------- reading


def read_results(results_path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file: a JSONL file of records (``critloop batch``/``bon``), or
    one JSON object, maybe spread over many lines (``critloop solve --json``).

    A JSONL line that is not a JSON object (a line torn by a crash, say) is skipped.

    Raises:
        ConfigError: the file is missing, unreadable, empty, or holds no record (naming it).
    """
    path = Path(results_path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the results file: {error}") from None
    if not text.strip():
        raise ConfigError(f"{path}: the results file is empty (nothing to view)")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        records = [r for r in whole if isinstance(r, dict)]
    else:
        records = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    if not records:
        raise ConfigError(f"{path}: the results file holds no records (nothing to view)")
    return records


# --------------------------------------------------------------------------- plots


def _png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_images(records: Sequence[Mapping[str, Any]], summary: BatchSummary, *, title: str) -> dict[str, str]:
    """The two plots of :mod:`critloop.graphs.report` (accuracy by round; rewards of flagged and
    passed steps) as ``data:`` URIs of PNG images, by caption.

    Args:
        records: the result records (the rewards come from their ``critiqued``).
        summary: their summary (:func:`~critloop.graphs.report.summarize`).
        title: the prefix of each plot's title.
    """
    flagged, passed = _rewards(records)
    return {
        "accuracy by round": _png_data_uri(_accuracy_figure(summary, title)),
        "critic rewards": _png_data_uri(_rewards_figure(flagged, passed, title)),
    }


# --------------------------------------------------------------------------- the data


def _words(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The blank ``text`` starts with, and its words, each with the blank after it."""
    lead = text[: len(text) - len(text.lstrip())]
    return lead, re.findall(r"(\S+)(\s*)", text)


def word_diff(before: str, after: str) -> list[list[str]]:
    """A word-level diff of two texts, as ``[op, text]`` runs: op ``=`` (kept), ``-`` (only in
    ``before``) or ``+`` (only in ``after``); joining the ``=`` and ``-`` runs gives ``before``,
    joining the ``=`` and ``+`` runs gives ``after``.

    Example:
        >>> word_diff("so x = 5", "so x = 6")
        [['=', 'so x = '], ['-', '5'], ['+', '6']]
    """
    lead_a, a = _words(before)
    lead_b, b = _words(after)
    runs: list[list[str]] = []

    def add(op: str, text: str) -> None:
        if not text:
            return
        if runs and runs[-1][0] == op:
            runs[-1][1] += text
        else:
            runs.append([op, text])

    def change(old: str, new: str) -> None:
        if old == new:
            add("=", old)
            return
        # A blank that ends both sides is kept, not changed.
        blank = old[len(old.rstrip()) :]
        blank = blank if blank and new[len(new.rstrip()) :] == blank else ""
        add("-", old[: len(old) - len(blank)])
        add("+", new[: len(new) - len(blank)])
        add("=", blank)

    change(lead_a, lead_b)
    # Words are compared without their blanks: a blank recurs everywhere, which would slow the
    # matcher down and tie the diff to spacing.
    matcher = difflib.SequenceMatcher(None, [w for w, _ in a], [w for w, _ in b], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for (word, blank_a), (_, blank_b) in zip(a[i1:i2], b[j1:j2], strict=True):
                add("=", word)
                change(blank_a, blank_b)
        else:
            change("".join(w + s for w, s in a[i1:i2]), "".join(w + s for w, s in b[j1:j2]))
    return runs


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _steps(value: Any) -> list[str]:
    return [_text(step) or "" for step in _list(value)]


class _Strings:
    """A table of the step texts, which recur across a record's solutions: each appears once."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        found = self._ids.get(text)
        if found is None:
            found = self._ids[text] = len(self.table)
            self.table.append(text)
        return found


def _critiques(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for entry in _list(record.get("critiques")):
        if not isinstance(entry, Mapping):
            continue
        runs = [
            {
                "code": _text(run.get("code")) or "",
                "output": _text(run.get("output")) or "",
                "status": _text(run.get("status")) or "",
            }
            for run in _list(entry.get("code_runs"))
            if isinstance(run, Mapping)
        ]
        index = entry.get("index")
        out.append(
            {
                "round": entry.get("round") if isinstance(entry.get("round"), int) else 0,
                "index": index if isinstance(index, int) else -1,
                "step": _text(entry.get("step")) or "",
                "reward": _number(entry.get("reward")),
                "flagged": _flag(entry.get("flagged")),
                "tier": _text(entry.get("tier")),
                "verdict": _text(entry.get("verdict")),
                "critique": _text(entry.get("critique")) or "",
                "code_runs": runs,
            }
        )
    return out


def _same_step(kept: str, text: str) -> bool:
    """Whether ``kept`` (a critique's copy of a step, maybe cut and ending ``...``) is ``text``."""
    return kept == text or (kept.endswith("...") and text.startswith(kept[:-3]))


def _solution(
    steps: Sequence[str],
    round_number: float,
    critiques: Sequence[Mapping[str, Any]],
    fallback: Sequence[Any],
    strings: _Strings,
) -> list[list[Any]]:
    """Each step as ``[text id, reward, index into critiques]``: the latest critique of that step
    in a round up to ``round_number`` (a reused step was judged in an earlier round), else the
    reward in ``fallback`` (``step_rewards``, for the final solution)."""
    out: list[list[Any]] = []
    for i, text in enumerate(steps):
        found = None
        for k in range(len(critiques) - 1, -1, -1):
            c = critiques[k]
            if c["index"] == i and c["round"] <= round_number and _same_step(c["step"], text):
                found = k
                break
        if found is not None:
            reward = critiques[found]["reward"]
        else:
            reward = _number(fallback[i]) if i < len(fallback) else None
        out.append([strings.id(text), reward, found])
    return out


def _usage(value: Any) -> list[list[Any]]:
    if not isinstance(value, Mapping):
        return []
    roles = [*ROLES, *(r for r in value if r not in ROLES)]
    rows = []
    for role in roles:
        entry = value.get(role)
        if isinstance(entry, Mapping):
            cells = [_number(entry.get(key)) for key in ("calls", "prompt_tokens", "completion_tokens")]
            rows.append([str(role), *cells, _number(entry.get("seconds"))])
    return rows


def _record_data(record: Mapping[str, Any], number: int, strings: _Strings) -> dict[str, Any]:
    """What the page shows of one record, every text as a string and every step by its id."""
    critiques = _critiques(record)
    initial = _steps(record.get("initial_steps"))
    final = _steps(record.get("final_steps"))
    rounds_in = [r for r in _list(record.get("rounds")) if isinstance(r, Mapping)]
    solutions = [initial, *(_steps(r.get("steps")) for r in rounds_in)]
    # The final solution is the best one seen: the latest round that gave it, if any did.
    final_round: float = next(
        (k for k in range(len(solutions) - 1, -1, -1) if solutions[k] == final), math.inf
    )
    rewards = _list(record.get("step_rewards"))
    rounds = []
    for k, entry in enumerate(rounds_in, start=1):
        given = entry.get("round")
        round_number = given if isinstance(given, int) else k
        flagged = _text(entry.get("flagged_step")) or ""
        rewrite = _text(entry.get("rewrite")) or ""
        steps = solutions[k]
        rounds.append(
            {
                "round": round_number,
                "index": entry.get("index") if isinstance(entry.get("index"), int) else None,
                "reward": _number(entry.get("reward")),
                "critique": _text(entry.get("critique")) or "",
                "diff": word_diff(flagged, rewrite),
                "steps": _solution(
                    steps, round_number, critiques, rewards if steps == final else [], strings
                ),
            }
        )
    ci, cf = _flag(record.get("correct_initial")), _flag(record.get("correct_final"))
    samples = []
    picked = record.get("picked")
    for i, sample in enumerate(_list(record.get("samples"))):
        if isinstance(sample, Mapping):
            samples.append(
                {
                    "answer": _text(sample.get("answer")),
                    "score": _number(sample.get("score")),
                    "picked": i == picked,
                }
            )
    extra = {
        key: _text(record.get(key))
        for key in ("method", "aggregation", "error_source", "correct_majority", "majority_answer")
        if record.get(key) is not None
    }
    return {
        "id": _text(record.get("id")) or f"#{number}",  # a solve result has none
        "problem": _text(record.get("problem")) or "",
        "gold": _text(record.get("gold")),
        "answer": _text(record.get("answer")),
        "initial_answer": _text(record.get("initial_answer")),
        "correct_initial": ci,
        "correct_final": cf,
        "correct_by_round": [c for c in _list(record.get("correct_by_round")) if isinstance(c, bool)],
        "w2r": ci is False and cf is True,
        "r2w": ci is True and cf is False,
        "failed": record.get("stop_reason") == "error" or record.get("error") is not None,
        "stop_reason": _text(record.get("stop_reason")) or "unknown",
        "error": _text(record.get("error")),
        "seconds": _number(record.get("seconds")),
        "usage": _usage(record.get("usage")),
        "initial": _solution(initial, 0, critiques, rewards if initial == final else [], strings),
        "final": _solution(final, final_round, critiques, rewards, strings),
        "rounds": rounds,
        "critiques": [{k: v for k, v in c.items() if k != "step"} for c in critiques],
        "samples": samples,
        "extra": extra,
    }


def _script_json(data: Any) -> str:
    """``data`` as JSON safe inside a ``<script>`` element: no ``<`` at all (so no ``</script>``
    and no ``<!--``), each written as the JSON escape ``\\u003c``."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


# --------------------------------------------------------------------------- the page


def _pct(value: float, n: int) -> str:
    return f"{100 * value:.1f}% ({round(value * n)}/{n})"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _stats(stats: RewardStats | None) -> str:
    if stats is None:
        return "none"
    spread = f"[{stats.min:.3f}, {stats.max:.3f}]"
    return f"n={stats.count}, mean {stats.mean:.3f}, median {stats.median:.3f}, {spread}"


def _summary_rows(s: BatchSummary) -> list[tuple[str, str]]:
    rows = [
        ("problems", str(s.n)),
        ("errors", str(s.errors)),
        ("accuracy, initial", _pct(s.accuracy_initial, s.n)),
    ]
    rows += [(f"accuracy, after round {r}", _pct(a, s.n)) for r, a in enumerate(s.accuracy_by_round) if r > 0]
    rows += [
        ("accuracy, final (best seen)", _pct(s.accuracy_final, s.n)),
        ("wrong → right", str(s.flips_wrong_to_right)),
        ("right → wrong", str(s.flips_right_to_wrong)),
        ("stop reasons", ", ".join(f"{k} {v}" for k, v in s.stop_reasons.items())),
        ("mean rounds", _num(s.rounds_mean, 2)),
        ("rounds histogram", ", ".join(f"{k}: {v}" for k, v in s.rounds_histogram.items()) or "—"),
        ("mean completion tokens", _num(s.tokens_mean)),
        ("total completion tokens", f"{s.tokens_total:,}"),
        ("mean seconds", _num(s.seconds_mean, 2)),
        ("rewards, flagged steps", _stats(s.rewards_flagged)),
        ("rewards, passed steps", _stats(s.rewards_passed)),
    ]
    return rows


def _summary_html(records: Sequence[Mapping[str, Any]], title: str) -> str:
    summary = summarize(records)
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in _summary_rows(summary)
    )
    images = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="{uri}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for caption, uri in plot_images(records, summary, title=title).items()
    )
    return (
        '<details id="summary" open><summary>Summary</summary><div class="summary">'
        f'<table class="kv">{rows}</table><div class="plots">{images}</div></div>'
        "<p class=note>Errors count as wrong in every accuracy; after round r, a problem that "
        "stopped earlier keeps its last solution.</p></details>"
    )


def render_view(records: list[dict[str, Any]], *, title: str) -> str:
    """The HTML page of ``records``: a summary with the report's plots (when the records are
    graded), a problem list with filters, and each problem's solutions, critiques and rounds.

    Args:
        records: batch or Best-of-N result records, or one ``critloop solve`` result.
        title: the page's title.

    Returns:
        The page, self-contained: it loads nothing from the network.

    Raises:
        ConfigError: there are no records.
    """
    if not records:
        raise ConfigError("no result records to view")
    graded = any("correct_initial" in r or "correct_final" in r for r in records)
    strings = _Strings()
    data = {
        "graded": graded,
        "records": [_record_data(record, n, strings) for n, record in enumerate(records, start=1)],
        "strings": strings.table,
    }
    summary = _summary_html(records, title) if graded else ""
    parts = {"TITLE": html.escape(title), "SUMMARY": summary, "DATA": _script_json(data)}
    # One pass: a title or a text that looks like a placeholder stays as it is.
    return re.sub(r"%(TITLE|SUMMARY|DATA)%", lambda m: parts[m.group(1)], _PAGE)


def write_view(results_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the page of a results file (see :func:`render_view`).

    Args:
        results_path: a JSONL results file, or a ``critloop solve --json`` result.
        out: the page (default: the results file with the suffix ``.html``).

    Returns:
        The page's path.

    Raises:
        ConfigError: the results file is missing, unreadable or empty, or ``out`` is it.
    """
    path = Path(results_path)
    records = read_results(path)
    target = Path(out) if out is not None else path.with_suffix(".html")
    if target.resolve() == path.resolve():
        raise ConfigError(f"{target}: the page would overwrite the results file; choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_view(records, title=path.name), encoding="utf-8")
    return target


def make_server(page: str | Path, port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that serves ``page`` (read afresh at each request) at ``/``.

    Call ``serve_forever()`` on it (``server_address`` has the port, when ``port`` is 0), and
    ``server_close()`` at the end.

    Raises:
        ConfigError: the port cannot be bound (in use, say).
    """
    path = Path(page)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", f"/{path.name}"):
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
            pass

    try:
        return ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as error:
        raise ConfigError(f"cannot serve on 127.0.0.1:{port}: {error.strerror or error}") from None


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;background:#fff}
header{padding:10px 18px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
h1{font-size:18px;margin:0}
#summary{padding:6px 18px;border-bottom:1px solid #d0d7de}
#summary>summary{cursor:pointer;font-weight:600}
.summary{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start;font-size:13px}
.summary table.kv{max-width:470px}
table.kv th{text-align:left;font-weight:500;color:#57606a;padding:1px 12px 1px 0;vertical-align:top}
table.kv td{padding:1px 0}
.plots{display:flex;gap:10px;flex-wrap:wrap}
.plots figure{margin:0}.plots img{width:350px;height:auto;border:1px solid #eee}
.meta{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start;margin-top:8px;font-size:13px}
figcaption,.note{font-size:12px;color:#57606a}
#browser{display:grid;grid-template-columns:360px 1fr;height:100vh;border-top:1px solid #d0d7de}
#side{display:flex;flex-direction:column;border-right:1px solid #d0d7de;min-height:0}
#filters{padding:8px 10px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
#filters .seg{display:flex;flex-wrap:wrap;gap:4px;margin-bottom:6px}
#filters label.opt{border:1px solid #d0d7de;border-radius:12px;padding:1px 8px;cursor:pointer;background:#fff}
#filters label.opt:has(input:checked){background:#0969da;color:#fff;border-color:#0969da}
#filters label.opt input{display:none}
#filters input[type=search]{width:100%;padding:4px 6px;margin-top:4px}
#count{font-size:12px;color:#57606a;margin-top:4px}
#list{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#list li{padding:6px 10px;border-bottom:1px solid #eaeef2;cursor:pointer}
#list li:hover{background:#f3f6fa}#list li.active{background:#ddf4ff}
#list .id{font-weight:600;margin-right:6px}
#list .preview{color:#57606a;font-size:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.badge{display:inline-block;font-size:11px;border-radius:8px;padding:0 6px;margin-right:4px;
background:#eaeef2}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.err{background:#a40e26;color:#fff}
#detail{overflow-y:auto;padding:12px 20px;min-height:0}
#detail h2{font-size:17px;margin:0 0 6px}#detail h3{font-size:15px;margin:16px 0 6px}
.problem,.text,.critique,pre{white-space:pre-wrap;word-break:break-word}
.problem{background:#f6f8fa;padding:8px;border-radius:6px}
table.grid{border-collapse:collapse;font-size:12px}
table.grid td,table.grid th{border:1px solid #d0d7de;padding:2px 8px;text-align:right}
table.grid th:first-child,table.grid td:first-child{text-align:left}
.step{border-left:5px solid #ccc;border-radius:4px;padding:5px 8px;margin:5px 0}
.stephead{font-size:12px;color:#57606a}.stephead .reward{font-weight:600;color:#1f2328}
details.more{margin-top:3px}details.more>summary{cursor:pointer;color:#0969da;font-size:12px}
pre{background:#fff;border:1px solid #eaeef2;padding:6px;margin:4px 0;font-size:12px}
pre.out{background:#f6f8fa}
.round{border:1px solid #d0d7de;border-radius:6px;padding:8px;margin:8px 0}
.critique{font-size:13px;color:#57606a;border-left:3px solid #d0d7de;padding-left:8px}
.diff{margin:6px 0;padding:6px;background:#fff;border:1px solid #eaeef2;white-space:pre-wrap}
del{background:#ffebe9;color:#82071e;padding:0 1px}
ins{background:#dafbe1;color:#116329;text-decoration:none;padding:0 1px;margin-left:1px}
.muted{color:#57606a}
</style>
</head>
<body>
<header><h1>%TITLE%</h1></header>
%SUMMARY%
<div id="browser">
<div id="side">
<div id="filters">
<div class="seg" id="outcomes"></div>
<label>stop reason <select id="stop"><option value="">all</option></select></label>
<input type="search" id="search" placeholder="search id or problem" aria-label="search id or problem">
<div id="count"></div>
</div>
<ul id="list"></ul>
</div>
<div id="detail"><p class="muted">Choose a problem.</p></div>
</div>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
(function () {
  var DATA = JSON.parse(document.getElementById("data").textContent);
  var S = DATA.strings, R = DATA.records;
  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function fmt(x, d) { return x === null || x === undefined ? "—" : x.toFixed(d); }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
  function orNone(x) { return x === null ? "none" : x; }
  function row(tag, cells) {
    var tr = el("tr");
    cells.forEach(function (c) { tr.appendChild(el(tag, {text: c})); });
    return tr;
  }
  function mark(ok) {
    if (ok === true) return el("span", {cls: "badge ok", text: "✓"});
    if (ok === false) return el("span", {cls: "badge bad", text: "✗"});
    return el("span", {cls: "badge", text: "?"});
  }
  function colours(reward) {
    if (reward === null || reward === undefined) return ["#f4f4f4", "#c8c8c8"];
    var h = Math.round(120 * Math.max(0, Math.min(1, reward)));
    return ["hsl(" + h + ",70%,90%)", "hsl(" + h + ",60%,42%)"];
  }

  // ----- the list and its filters
  var OUTCOMES = [["all", "all"]];
  if (DATA.graded) OUTCOMES.push(["w2r", "wrong → right"], ["r2w", "right → wrong"]);
  OUTCOMES.push(["failed", "errors"]);
  var seg = document.getElementById("outcomes");
  OUTCOMES.forEach(function (o, i) {
    var input = el("input", {type: "radio", name: "outcome", value: o[0], id: "f-" + o[0]});
    if (i === 0) input.checked = true;
    seg.appendChild(el("label", {cls: "opt", "for": "f-" + o[0]}, input, o[1]));
  });
  var stop = document.getElementById("stop");
  var reasons = {};
  R.forEach(function (r) { reasons[r.stop_reason] = (reasons[r.stop_reason] || 0) + 1; });
  Object.keys(reasons).sort().forEach(function (k) {
    stop.appendChild(el("option", {value: k, text: k + " (" + reasons[k] + ")"}));
  });
  var list = document.getElementById("list"), rows = [], hay = [];
  R.forEach(function (r, i) {
    var badges = el("span", {cls: "badges"});
    if (DATA.graded && !r.failed) {
      badges.appendChild(mark(r.correct_initial));
      badges.appendChild(document.createTextNode("→ "));
      badges.appendChild(mark(r.correct_final));
    }
    var failed = r.failed && r.stop_reason !== "error";  // an error without its stop reason
    if (failed) badges.appendChild(el("span", {cls: "badge err", text: "error"}));
    var li = el("li", {"data-i": String(i), "data-id": r.id, tabindex: "0"},
      el("span", {cls: "id", text: r.id}), badges,
      el("span", {cls: r.stop_reason === "error" ? "badge err" : "badge", text: r.stop_reason}),
      r.rounds.length ? el("span", {cls: "badge", text: plural(r.rounds.length, "round")}) : null,
      el("div", {cls: "preview", text: r.problem.slice(0, 160)}));
    rows.push(li);
    hay.push((r.id + "\\n" + r.problem).toLowerCase());
    list.appendChild(li);
  });
  var search = document.getElementById("search"), count = document.getElementById("count");
  function applyFilters() {
    var outcome = document.querySelector("input[name=outcome]:checked").value;
    var reason = stop.value, q = search.value.trim().toLowerCase(), shown = 0;
    R.forEach(function (r, i) {
      var ok = (outcome === "all" || r[outcome]) && (!reason || r.stop_reason === reason)
        && (!q || hay[i].indexOf(q) >= 0);
      rows[i].hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = shown + " of " + plural(R.length, "problem") + " shown";
  }
  seg.addEventListener("change", applyFilters);
  stop.addEventListener("change", applyFilters);
  search.addEventListener("input", applyFilters);

  // ----- one problem, built when it is opened
  function critiqueBlock(c) {
    var parts = [];
    if (c.critique) {
      var how = [c.tier, c.verdict].filter(function (x) { return x; }).join(", ");
      parts.push(el("details", {cls: "more critique-details"},
        el("summary", {text: "critique" + (how ? " (" + how + ")" : "")}),
        el("div", {cls: "critique", text: c.critique})));
    }
    if (c.code_runs.length) {
      var box = el("details", {cls: "more code-details"},
        el("summary", {text: "code (" + plural(c.code_runs.length, "run") + ")"}));
      c.code_runs.forEach(function (run) {
        box.appendChild(el("pre", {cls: "code", text: run.code}));
        box.appendChild(el("div", {cls: "muted", text: "output (" + run.status + ")"}));
        box.appendChild(el("pre", {cls: "out", text: run.output}));
      });
      parts.push(box);
    }
    return parts;
  }
  function solution(r, steps) {
    var box = el("div", {cls: "solution"});
    if (!steps.length) box.appendChild(el("p", {cls: "muted", text: "no steps"}));
    steps.forEach(function (s, i) {
      var reward = s[1], c = s[2] === null ? null : r.critiques[s[2]];
      var col = colours(reward);
      var head = el("div", {cls: "stephead"}, "Step " + (i + 1) + " · reward ",
        el("span", {cls: "reward", text: reward === null ? "not judged" : reward.toFixed(3)}),
        c && c.flagged ? el("span", {cls: "badge bad", text: "flagged"}) : null,
        c && c.round ? el("span", {cls: "muted", text: " (judged after round " + c.round + ")"}) : null);
      var step = el("div", {cls: "step", "data-reward": reward === null ? "" : String(reward)},
        head, el("div", {cls: "text", text: S[s[0]]}));
      step.style.backgroundColor = col[0];
      step.style.borderLeftColor = col[1];
      if (c) critiqueBlock(c).forEach(function (p) { step.appendChild(p); });
      box.appendChild(step);
    });
    return box;
  }
  function same(a, b) {
    return a.length === b.length && a.every(function (s, i) { return s[0] === b[i][0]; });
  }
  function facts(r) {
    var table = el("table", {cls: "kv facts"});
    function fact(k, v) {
      if (v === null || v === undefined || v === "") return;
      table.appendChild(el("tr", null, el("th", {text: k}), el("td", null, v)));
    }
    fact("gold", r.gold);
    if (DATA.graded) {
      fact("initial answer", el("span", null, mark(r.correct_initial), orNone(r.initial_answer)));
      fact("final answer", el("span", null, mark(r.correct_final), orNone(r.answer)));
      var ticks = r.correct_by_round.map(function (c) { return c ? "✓" : "✗"; });
      if (ticks.length) fact("correct by round", ticks.join(" "));
    } else fact("answer", orNone(r.answer));
    fact("stop reason", r.stop_reason);
    if (r.error !== null) fact("error", el("span", {cls: "badge err", text: r.error}));
    Object.keys(r.extra).forEach(function (k) { fact(k.replace(/_/g, " "), r.extra[k]); });
    fact("seconds", r.seconds === null ? null : r.seconds.toFixed(2));
    return table;
  }
  function usage(r) {
    var t = el("table", {cls: "grid usage"},
      row("th", ["role", "calls", "prompt tokens", "completion tokens", "seconds"]));
    r.usage.forEach(function (u) {
      t.appendChild(row("td", [u[0], fmt(u[1], 0), fmt(u[2], 0), fmt(u[3], 0), fmt(u[4], 2)]));
    });
    return t;
  }
  function round(r, rd) {
    var box = el("div", {cls: "round"});
    var where = rd.index === null ? "?" : String(rd.index + 1);
    var title = "Round " + rd.round + ": step " + where + " flagged, reward ";
    var reward = el("span", {cls: "reward", text: fmt(rd.reward, 3)});
    box.appendChild(el("div", {cls: "stephead"}, title, reward));
    if (rd.critique) box.appendChild(el("div", {cls: "critique", text: rd.critique}));
    var diff = el("div", {cls: "diff"});
    rd.diff.forEach(function (run) {
      if (run[0] === "=") diff.appendChild(document.createTextNode(run[1]));
      else diff.appendChild(el(run[0] === "-" ? "del" : "ins", {text: run[1]}));
    });
    box.appendChild(diff);
    var label = "solution after round " + rd.round + " (" + plural(rd.steps.length, "step") + ")";
    box.appendChild(el("details", {cls: "more"}, el("summary", {text: label}), solution(r, rd.steps)));
    return box;
  }
  function detail(r) {
    var d = el("div", {cls: "problem-detail"},
      el("h2", {text: r.id}), el("div", {cls: "problem", text: r.problem}),
      el("div", {cls: "meta"}, facts(r), r.usage.length ? usage(r) : null));
    d.append(el("h3", {text: "Final solution"}), solution(r, r.final));
    if (r.rounds.length) {
      d.appendChild(el("h3", {text: "Refinement rounds"}));
      r.rounds.forEach(function (rd) { d.appendChild(round(r, rd)); });
    }
    if (r.samples.length) {
      var st = el("table", {cls: "grid samples"}, row("th", ["sample", "answer", "score"]));
      r.samples.forEach(function (s, i) {
        st.appendChild(row("td", [i + (s.picked ? " (picked)" : ""), orNone(s.answer), fmt(s.score, 3)]));
      });
      d.append(el("h3", {text: "Samples"}), st);
    }
    if (r.initial.length && !same(r.initial, r.final)) {
      var label = "Initial solution (" + plural(r.initial.length, "step") + ")";
      var initial = el("details", {cls: "more initial"}, el("summary", {text: label}));
      d.appendChild(initial).appendChild(solution(r, r.initial));
    } else if (r.initial.length) {
      d.appendChild(el("p", {cls: "muted", text: "The initial solution is the final one."}));
    }
    return d;
  }
  var pane = document.getElementById("detail"), active = null;
  function open(i) {
    if (active !== null) rows[active].classList.remove("active");
    active = i;
    rows[i].classList.add("active");
    pane.replaceChildren(detail(R[i]));
    pane.scrollTop = 0;
    history.replaceState(null, "", "#" + encodeURIComponent(R[i].id));
  }
  list.addEventListener("click", function (e) {
    var li = e.target.closest("li");
    if (li) open(Number(li.getAttribute("data-i")));
  });
  list.addEventListener("keydown", function (e) {
    var li = e.target.closest("li");
    if (li && e.key === "Enter") open(Number(li.getAttribute("data-i")));
  });
  applyFilters();
  var wanted = decodeURIComponent(location.hash.slice(1));
  var start = R.findIndex(function (r) { return r.id === wanted; });
  if (start < 0 && R.length === 1) start = 0;
  if (start >= 0) open(start);
  document.body.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""
