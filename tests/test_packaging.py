"""pyproject.toml's package list: every package folder ships, and kernels/ only as fastdit.kernels."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools_config():
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    cfg = _setuptools_config()
    found = ["fastdit.kernels"]
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "fastdit")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            found.append(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert sorted(cfg["packages"]) == sorted(found), "list new package folders in pyproject.toml"
    assert cfg["package-dir"] == {"fastdit.kernels": "kernels"}
    assert os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py"))
