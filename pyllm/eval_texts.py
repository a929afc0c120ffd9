"""Evaluation texts of different kinds, from packages anyone can install, for perplexity by domain.

Each domain names the package that ships its text (so the same text can be had on any machine) and
how the text is made from the package's files. None of them is used for calibration: the built-in
calibration set (pyllm/convert/calibrate.py) is tested to share no 64-character span with any of them
(tests/test_calibration_set.py).

  python-docs    Python's documentation topics (pydoc_data.topics, CPython's standard library),
                 values sorted by key, joined by blank lines (pyllm.perplexity.default_text)
  english-prose  Debian package `fortunes`: /usr/share/games/fortunes/literature then .../people
                 (quotations and excerpts of English literature), the '%' separators as blank lines
  chinese-prose  Debian package `fortunes-zh`: /usr/share/games/fortunes/chinese (modern Chinese
                 prose: essays, sayings, Debian's code of conduct), terminal colour codes removed
  code           PyPI package `jinja2`: the source of jinja2/lexer.py, parser.py and compiler.py
                 (Python code)

domain_text(name) raises FileNotFoundError naming the package to install when its files are missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FORTUNES_DIR = "/usr/share/games/fortunes"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Domain:
    name: str
    package: str  # where the text comes from: "python (stdlib)", "debian:fortunes", "pypi:jinja2"
    paths: str  # the files, as docs/QUALITY.md records them


def _fortunes(names: tuple[str, ...], package: str) -> str:
    parts = []
    for name in names:
        path = os.path.join(FORTUNES_DIR, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: install the Debian package {package} "
                                    f"(apt-get install {package})")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = _ANSI.sub("", f.read())
        parts += [p.strip("\n") for p in re.split(r"^%$", text, flags=re.M) if p.strip()]
    return "\n\n".join(parts)


def _python_docs() -> str:
    from .perplexity import default_text

    return default_text()


def _code() -> str:
    import jinja2

    root = os.path.dirname(jinja2.__file__)
    parts = []
    for name in ("lexer.py", "parser.py", "compiler.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


DOMAINS = {
    "python-docs": (Domain("python-docs", "python (stdlib)", "pydoc_data/topics.py"), _python_docs),
    "english-prose": (Domain("english-prose", "debian:fortunes", f"{FORTUNES_DIR}/literature, {FORTUNES_DIR}/people"),
                      lambda: _fortunes(("literature", "people"), "fortunes")),
    "chinese-prose": (Domain("chinese-prose", "debian:fortunes-zh", f"{FORTUNES_DIR}/chinese"),
                      lambda: _fortunes(("chinese",), "fortunes-zh")),
    "code": (Domain("code", "pypi:jinja2", "jinja2/lexer.py, jinja2/parser.py, jinja2/compiler.py"), _code),
}
DOMAIN_NAMES = tuple(DOMAINS)


def domain_text(name: str) -> str:
    """The evaluation text of domain `name` (one of DOMAIN_NAMES). Raises KeyError for an unknown
    name, FileNotFoundError when the package shipping the text is not installed."""
    if name not in DOMAINS:
        raise KeyError(f"unknown evaluation domain {name!r} (choose from {', '.join(DOMAIN_NAMES)})")
    return DOMAINS[name][1]()


def package_version(domain: str) -> str:
    """The installed version of the package shipping `domain`'s text ('' when unknown)."""
    package = DOMAINS[domain][0].package
    kind, _, name = package.partition(":")
    if kind == "pypi":
        from importlib.metadata import version

        return version(name)
    if kind == "debian":
        import subprocess

        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""
    import platform

    return platform.python_version()
