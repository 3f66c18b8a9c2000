"""``python main.py server`` / ``python main.py client``: the same as the ``cipherpost`` command.

Works from a clone after ``pip install -e .``; without installing, it finds the package in ``src/``
(its dependencies must still be installed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from cipherpost.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
