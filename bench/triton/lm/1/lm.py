"""Triton loads this file (config.pbtxt's default_model_filename); the model lives in bench/triton_lm.py.

The python-backend stub ignores PYTHONPATH, so bench/triton_server.py names the directories to import
from in CELLGATE_PEER_PATH (numpy < 2 for the stub, this repository, its virtual environment): they go
first on sys.path, and site.addsitedir also reads the environment's .pth files.
"""

import os
import site
import sys

_before = list(sys.path)
for _entry in filter(None, os.environ.get("CELLGATE_PEER_PATH", "").split(os.pathsep)):
    site.addsitedir(_entry)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

from bench.triton_lm import TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
