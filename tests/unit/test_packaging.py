"""A plain ``pip install`` of the wheel (not editable, no source tree beside it) can render and
``sslscale submit --dry-run`` a Slurm job: the job template is package data
(``launcher/templates/train.sbatch``). The wheel is built from a copy of the sources with this
venv's setuptools (``--no-build-isolation --no-index``: offline) and installed with ``--no-deps``
into a throwaway venv that sees this venv's site-packages only for the dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from ..conftest import DEMO_RECIPE, ROOT, tiny_overrides


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=120,
                          env={**env, **kw.pop("env", {})}, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """``{"wheel", "python", "sslscale", "venv"}`` of a throwaway venv with the wheel installed."""
    try:
        setuptools_version = version("setuptools")
    except PackageNotFoundError:
        pytest.skip("setuptools is not installed in this venv: cannot build the wheel offline")
    if int(setuptools_version.split(".")[0]) < 77:  # pyproject.toml's build-system.requires
        pytest.skip(f"setuptools {setuptools_version} < 77 cannot build this project offline")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("launcher", "sslscale"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-q", src, "-w", root / "dist"])
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((root / "dist").glob("sslscale-*.whl"))

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # the dependencies (jinja2, omegaconf, torch ...) from this venv; a path in a .pth file is
    # not itself a site dir, so this venv's editable-install hook is not run there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                 "--no-index", "-q", wheel])
    assert done.returncode == 0, done.stdout + done.stderr
    return {"wheel": wheel, "venv": venv, "python": venv / "bin" / "python", "sslscale": venv / "bin" / "sslscale"}


def test_wheel_ships_the_job_template_and_the_license(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        metadata = whl.read("sslscale-0.1.0.dist-info/METADATA").decode()
    assert "launcher/templates/train.sbatch" in names and "sslscale/templates/modelcard.md.j2" in names
    assert "sslscale-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata


RENDER = """
import sys
from pathlib import Path
from launcher import slurm
venv = Path(sys.argv[1])
assert Path(slurm.__file__).is_relative_to(venv), slurm.__file__  # the installed copy, not the checkout
assert slurm.TEMPLATE.is_relative_to(venv) and slurm.TEMPLATE.is_file(), slurm.TEMPLATE
run = Path(sys.argv[2])
print(slurm.render(slurm.JobSpec(job_name="w", nodes=2), run_dir=run, workdir=run.parent,
                   config=run / "c.yaml", python="python"))
"""


def test_installed_wheel_renders_a_job(installed, tmp_path):
    done = _run([installed["python"], "-I", "-c", RENDER, installed["venv"], tmp_path / "run"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --job-name=w" in done.stdout and "#SBATCH --nodes=2" in done.stdout
    assert "-m sslscale.train" in done.stdout


def test_installed_wheel_submits_dry_run(installed, real_shards, tmp_path):
    """The console script of the wheel, from a directory that is not the checkout."""
    run_dir = tmp_path / "run"
    done = _run([installed["sslscale"], "submit", DEMO_RECIPE, *tiny_overrides(real_shards, run_dir),
                 "--nodes", "2", "--dry-run"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and f"{installed['python']} -m sslscale.train" in done.stdout
    assert not run_dir.exists()
