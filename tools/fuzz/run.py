"""Runs one fuzz target under atheris (coverage-guided, libFuzzer's engine):

    python tools/fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of tools/fuzz/targets.py's TARGETS. pyllm, jinja2 and gguf are instrumented for
coverage (the C++ loader is exercised but not instrumented: build it with PYLLM_SANITIZE to check
it for memory errors). A crash, an unexpected exception or a libFuzzer timeout writes the input to
libFuzzer's artifact path and exits non-zero. tools/fuzz.sh runs every target.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ordinary_imports() -> list[str]:
    """An editable install imports pyllm through its own finder, whose modules atheris cannot
    instrument: import pyllm's Python files from the source tree with Python's ordinary finder
    instead, and its compiled modules from where they are installed (returned, for __path__)."""
    finders = [f for f in sys.meta_path if type(f).__name__ == "ScikitBuildRedirectingFinder"]
    if not finders:
        return []
    import importlib.util

    compiled = os.path.dirname(importlib.util.find_spec("pyllm._core").origin)
    for name in [m for m in sys.modules if m == "pyllm" or m.startswith("pyllm.")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if f not in finders]
    sys.path.insert(0, ROOT)
    return [compiled]


extra_path = _ordinary_imports()
with atheris.instrument_imports(include=["pyllm", "jinja2", "gguf"]):
    import pyllm

    pyllm.__path__.extend(extra_path)
    import jinja2.sandbox  # noqa: F401
    import pyllm.chat_template  # noqa: F401
    import pyllm.convert.gguf_source  # noqa: F401
    import pyllm.formats.packed  # noqa: F401
    import pyllm.llm  # noqa: F401
    import pyllm.serve  # noqa: F401
    import pyllm.tokenizer  # noqa: F401
import targets  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer options] [corpus dirs]; TARGET: {', '.join(targets.TARGETS)}")
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, lambda data: targets.run(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
