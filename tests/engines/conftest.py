"""pytest glue of the real-engine tier; the code lives in isep_engines_lib.py
(loaded by file path so that it never clashes with another conftest)."""
import importlib.util
import sys
from pathlib import Path


def _load_lib():
    name = "isep_engines_lib"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_lib = _load_lib()
pytest_configure = _lib.pytest_configure
pytest_collection_modifyitems = _lib.pytest_collection_modifyitems
pytest_sessionfinish = _lib.pytest_sessionfinish
pytest_runtest_logreport = _lib.pytest_runtest_logreport
engines = _lib.engines
