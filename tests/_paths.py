"""Imports a module from a folder of the repository that is not a package (benchmarks/, tests/ops/)
for the tests: the folder is on sys.path only while the module is imported. (pytest puts tests/ on
sys.path through tests/conftest.py, so every test file and helper can import this.)"""
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_from(folder: str, name: str):
    """The module `name` of REPO/`folder` (a path relative to the repository, '/'-separated)."""
    sys.path.insert(0, os.path.join(REPO, *folder.split("/")))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
