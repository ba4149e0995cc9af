"""sparsetrace.report: a static, offline HTML report for run folders and a read-only server for it.

* :func:`build_report` writes ``index.html`` + ``assets/`` + ``data/`` (opens from disk via file://);
* :func:`serve` / :func:`make_server` serve a built report read-only on 127.0.0.1.
"""

from sparsetrace.report.html import build_report
from sparsetrace.report.server import make_server, serve

__all__ = ["build_report", "make_server", "serve"]
