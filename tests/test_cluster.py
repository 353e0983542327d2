"""The Slurm backend against a real single-node Slurm that this test starts itself
(slurmctld + slurmd + munged, no accounting database, no cgroups)."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import tiny_overrides
from escapelab.config import SlurmOptions
from escapelab.sweep import SweepSpec, run_sweep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_ok() -> bool:
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        return token.returncode == 0 and subprocess.run(
            ["unmunge"], input=token.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.environ.get("ESCAPELAB_NO_SLURM"):
        pytest.skip("ESCAPELAB_NO_SLURM is set")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "munged")
               if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm is not installed (missing {missing}); `make test` installs it "
                    "via scripts/install-system-test-deps.sh, or set ESCAPELAB_NO_SLURM=1")
    if not _munge_ok():
        # munged needs a socket folder that others can traverse; it runs as its own user.
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        os.chmod("/run/munge", 0o755)
        subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged")], check=True)
        for _ in range(50):
            if _munge_ok():
                break
            time.sleep(0.1)
    root = tmp_path_factory.mktemp("slurm")
    (root / "spool").mkdir()
    (root / "state").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=escapelab-test", f"SlurmctldHost={host}", "SlurmUser=root",
        "SlurmdUser=root", "AuthType=auth/munge", "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmdSpoolDir={root}/spool", f"StateSaveLocation={root}/state",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "SchedulerType=sched/backfill", "SchedulerParameters=batch_sched_delay=0",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
        "MinJobAge=3600",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", host], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        if state == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the test Slurm node did not come up: {(root / 'slurmctld.log').read_text()}")
    yield env
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
    time.sleep(1)


def test_sweep_runs_through_slurm(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    over = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in tiny_overrides(**{"train.steps": 30})}
    spec = SweepSpec(name="slurm", base="digits", overrides=over,
                     grid={"case": [{"label": "ok", "optim.lr": 100},
                                    {"label": "broken", "data.batch_size": 100000}],
                           "seed": [0, 1]})
    seen = []
    result = run_sweep(spec, tmp_path, backend="slurm",
                       slurm=SlurmOptions(wait_s=300, poll_s=0.5),
                       progress=lambda i, n, p, r: seen.append((p.label, r["status"])))
    assert result["ran"] == 4 and len(seen) == 4
    with (tmp_path / "runs.csv").open() as f:
        rows = {r["run"].rsplit("-", 1)[0]: r for r in csv.DictReader(f)}
    assert rows["case=ok_seed=0"]["status"] == "completed"
    assert rows["case=ok_seed=1"]["status"] == "completed"
    assert rows["case=broken_seed=0"]["status"] == "failed"
    # The jobs really went through Slurm: submitit's files and the controller's records.
    assert list((tmp_path / "slurm").glob("*_submission.sh"))
    for _ in range(120):  # results land before the job processes exit
        queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=slurm,
                               capture_output=True, text=True).stdout
        if queue.count("COMPLETED") >= 4:
            break
        time.sleep(0.5)
    assert queue.count("COMPLETED") >= 4, queue
    again = run_sweep(spec, tmp_path, backend="slurm",
                      slurm=SlurmOptions(wait_s=300, poll_s=0.5))
    assert again["skipped"] == 2 and again["ran"] == 2


def test_a_killed_task_is_recorded_not_waited_for(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    over = {o.split("=", 1)[0]: o.split("=", 1)[1]
            for o in tiny_overrides(**{"train.steps": 100000})}
    spec = SweepSpec(name="kill", base="digits", overrides=over, grid={"seed": [0]})

    import threading

    def cancel_soon():
        deadline = time.time() + 120
        while time.time() < deadline:
            jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %j"], env=slurm,
                                  capture_output=True, text=True).stdout.split("\n")
            mine = [j.split()[0] for j in jobs if "escapelab-" + tmp_path.name in j]
            if mine and (tmp_path / "runs").exists() and any((tmp_path / "runs").iterdir()):
                time.sleep(2)
                subprocess.run(["scancel", *mine], env=slurm)
                return
            time.sleep(0.5)

    killer = threading.Thread(target=cancel_soon)
    killer.start()
    start = time.time()
    run_sweep(spec, tmp_path, backend="slurm", slurm=SlurmOptions(wait_s=300, poll_s=0.5))
    killer.join()
    assert time.time() - start < 200
    with (tmp_path / "runs.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "failed" and "ended without a result" in row["error"]
