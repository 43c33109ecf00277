"""The thin public face: `kvnet.__all__` resolves, `import kvnet` loads no torch, and every
exception kvnet defines descends from the one root, KvnetError."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import kvnet
from kvnet.errors import KvnetError
from tests.test_layers import _modules


def test_every_public_name_resolves():
    for name in kvnet.__all__:
        assert getattr(kvnet, name) is not None, name


def test_import_kvnet_loads_no_torch():
    code = "import sys, kvnet; kvnet.Store; kvnet.KvnetError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_kvnet_exception_is_a_kvnet_error():
    strays = []
    for name in _modules():
        if name in ("kvnet.cli",):  # imports fine, but keep the check to library modules
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name
                    and not issubclass(obj, KvnetError) and not attr.startswith("_")):
                strays.append(f"{name}.{attr}")
    assert strays == [], f"subclass KvnetError (kvnet/errors.py): {strays}"
