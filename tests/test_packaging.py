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


# The console commands and the `python -m` form each one equals.
COMMANDS = {
    "fastdit-train": ("fastdit.train", "fastdit.train"),
    "fastdit-launch": ("fastdit.training.launch", "fastdit.training.launch"),
    "fastdit-sample": ("fastdit.sample", "fastdit.generate.sample"),
    "fastdit-sample-fid": ("fastdit.sample_fid", "fastdit.generate.sample_fid"),
    "fastdit-evaluate": ("fastdit.evaluate", "fastdit.evaluate.run"),
    "fastdit-export": ("fastdit.export", "fastdit.weights.export"),
    "fastdit-interop": ("fastdit.interop", "fastdit.weights.interop"),
    "fastdit-extract-latents": ("fastdit.extract_latents", "fastdit.extract_latents"),
    "fastdit-flops": ("fastdit.flops", "fastdit.flops"),
}


def test_console_commands_are_the_python_m_commands():
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    import importlib
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {name: f"{code}:main" for name, (_, code) in COMMANDS.items()}
    for name, (m_name, code) in COMMANDS.items():
        target = getattr(importlib.import_module(code), "main")
        if m_name == "fastdit.evaluate":  # a package: its __main__ runs fastdit.evaluate.run.main
            src = open(os.path.join(ROOT, "fastdit", "evaluate", "__main__.py")).read()
            assert "from fastdit.evaluate.run import main" in src
        else:  # fastdit/sample.py & co. hand over their module: importing it gives the code module
            assert importlib.import_module(m_name).main is target, name


def _tree_copy(dst):
    """The files of this checkout git knows of (tracked or not ignored), links kept, copied to dst."""
    import shutil
    import subprocess
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
            os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout")
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src, out = os.path.join(ROOT, name), os.path.join(dst, name)
        if not os.path.lexists(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)


def test_offline_wheel_holds_only_fastdit_with_kernels_and_configs(tmp_path):
    import glob
    import subprocess
    import zipfile
    src = tmp_path / "src"
    _tree_copy(str(src))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           ".", "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "setuptools" in proc.stderr and "requirement" in proc.stderr.lower():
        pytest.skip(f"setuptools >= 70.1 is not installed: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fastdit", "fastdit-0.1.0.dist-info"}, tops  # no configs/, kernels/, tests/ at the top
    for f in os.listdir(os.path.join(ROOT, "kernels")):
        if f.endswith(".py"):
            assert f"fastdit/kernels/{f}" in names
    for f in os.listdir(os.path.join(ROOT, "fastdit", "configs")):
        assert f"fastdit/configs/{f}" in names
    entry_points = zipfile.ZipFile(wheel).read("fastdit-0.1.0.dist-info/entry_points.txt").decode()
    for name in COMMANDS:
        assert f"{name} = " in entry_points

    # Installed from the wheel and imported outside the checkout: the kernels and the configs by name.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import fastdit, fastdit.kernels, os; from fastdit.training.config import load_config; "
            "cfg = load_config('digits'); print(fastdit.kernels.__file__); print(cfg.path)")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, cfg_path = proc.stdout.split()
    assert kernels_file.startswith(str(site)) and cfg_path.startswith(str(site)), proc.stdout


def test_kernels_import_as_fastdit_kernels_from_the_checkout():
    import subprocess
    code = "import fastdit.kernels, sys; print(fastdit.kernels.__file__); print('kernels' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, toplevel = proc.stdout.split()
    assert os.path.samefile(path, os.path.join(ROOT, "kernels", "__init__.py")) and toplevel == "False"
