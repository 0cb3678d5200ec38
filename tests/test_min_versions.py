"""The lower bounds of transformers and peft in pyproject.toml are real: the oldest releases they admit pass
the model, engine and checkpoint tests.

Slow, and needs PyPI: `python -m pytest -q -m slow tests/test_min_versions.py` (a few minutes). A virtualenv
made with `--system-site-packages` reuses this Python's torch and the rest; pip installs
`transformers==<min>` and `peft==<min>` with torch held at the installed version, so it adds only what those
two need that the system lacks or has too new (an older tokenizers and huggingface-hub). The bounds are read
from pyproject.toml, so raising one there raises it here.
"""

import importlib.metadata
import os
import re
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["tests/test_model.py", "tests/test_engine.py", "tests/test_checkpoint.py"]


def lower_bound(package: str) -> str:
    """The `>=` version of `package` among the core dependencies of pyproject.toml."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        match = re.match(rf"{package}\s*>=\s*([0-9][\w.]*)", dependency)
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml has no `{package}>=` dependency")


def hide_unrequired_kernels(site_packages: Path) -> None:
    """Newer transformers require `kernels` and import a present one at start-up; the oldest release does not
    require it and fails on the system's newer `kernels`. A clean install of the oldest has none, so hide it."""
    (transformers,) = importlib.metadata.distributions(name="transformers", path=[str(site_packages)])
    if any(r.startswith("kernels") and "extra ==" not in r for r in transformers.requires or []):
        return
    (site_packages / "kernels").mkdir(exist_ok=True)
    (site_packages / "kernels" / "__init__.py").write_text(
        f'raise ImportError("kernels hidden: transformers {transformers.version} does not require it")\n')


@pytest.mark.slow
def test_the_oldest_transformers_and_peft_allowed_pass_the_model_engine_and_checkpoint_tests(tmp_path):
    pins = {package: lower_bound(package) for package in ("transformers", "peft")}
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = str(env_dir / "bin" / "python")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={importlib.metadata.version('torch')}\n")  # never reinstall torch

    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              *(f"{p}=={v}" for p, v in pins.items()), "-c", str(constraints)],
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout + install.stderr
    site_packages = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    hide_unrequired_kernels(site_packages)
    installed = subprocess.check_output([python, "-c", "import peft, transformers; "
                                         "print(transformers.__version__, peft.__version__)"], text=True).split()
    assert [Version(v) for v in installed] == [Version(v) for v in pins.values()], installed

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([python, "-m", "pytest", "-q", "-x", *SUBSET, "-p", "no:cacheprovider"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    print(f"transformers=={pins['transformers']} peft=={pins['peft']}: {run.stdout.strip().splitlines()[-1:]}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
