"""Imported first by every benchmark script, before anything else.

Run as ``python bench/NAME.py``, a script has this folder first on
``sys.path``, where ``bench/queue.py`` would hide the standard library's
``queue`` (which asyncio and logging import). This takes the folder off the
path and puts the repository's root on it, for ``pbx``, ``tests.support``
and ``bench.measure``.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
