"""Running sweep points on a Slurm cluster through submitit (optional: ``pip install
'escapelab[slurm]'``).

All points go out as one job array (``OUT/slurm`` holds submitit's files; it must be on a
filesystem the compute nodes share). Results are read from the run directories, never
from submitit's result pickles; job states come from ``squeue``, so no accounting
database (``sacct``) is needed. Every wait is bounded: a task that dies without a
result is recorded as failed once it has left the queue, and ``wait_s`` bounds the
whole sweep.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from escapelab.config import config_to_dict
from escapelab.errors import EscapelabError
from escapelab.store import write_json

if TYPE_CHECKING:
    from escapelab.sweep import Point, Progress

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job still known to the controller (``squeue``), by job id."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    result = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j",
                             ",".join(arrays)], capture_output=True, text=True, timeout=30)
    states = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def run_slurm(tasks: list[tuple[Point, Path]], out: Path, options: dict[str, Any],
              progress: Progress | None) -> None:
    """Submit `tasks` as one job array and wait (bounded) until each has ended.

    options: partition, time_min (per task, default 60), cpus (per task, default 1),
    mem_gb, parallel (array parallelism, default 64), wait_s (default: none), poll_s.
    """
    try:
        import submitit
    except ImportError:
        raise EscapelabError("the slurm backend needs submitit: pip install "
                             "'escapelab[slurm]'") from None
    if shutil.which("sbatch") is None:
        raise EscapelabError("the slurm backend needs Slurm's sbatch on this machine")
    from escapelab.sweep import run_point

    executor = submitit.SlurmExecutor(folder=str(out / "slurm"))
    params: dict[str, Any] = {"time": int(options.get("time_min", 60)),
                              "cpus_per_task": int(options.get("cpus", 1)),
                              "array_parallelism": int(options.get("parallel", 64)),
                              "job_name": f"escapelab-{out.name}"}
    if options.get("partition"):
        params["partition"] = options["partition"]
    if options.get("mem_gb"):
        params["mem"] = f"{int(options['mem_gb'])}G"
    executor.update_parameters(**params)
    jobs = executor.map_array(run_point, [config_to_dict(p.config) for p, _ in tasks],
                              [str(d) for _, d in tasks],
                              [int(options.get("cpus", 1))] * len(tasks))
    ids = [str(job.job_id) for job in jobs]
    deadline = time.time() + float(options["wait_s"]) if options.get("wait_s") else None
    poll = float(options.get("poll_s", 2.0))
    pending = dict(enumerate(ids))
    done = 0
    while pending:
        states = queue_states(list(pending.values()))
        for i, job_id in list(pending.items()):
            point, run_dir = tasks[i]
            failure = out / "failures" / f"{run_dir.name}.json"
            finished = (run_dir / "summary.json").exists() or failure.exists()
            state = states.get(job_id)
            if not finished and (state is None or state in ENDED):
                # Left the queue (or ended) without a result: the task died.
                time.sleep(min(poll, 1.0))  # let a just-written summary land
                if not (run_dir / "summary.json").exists():
                    write_json(failure, {"status": "failed", "error":
                                         f"slurm job {job_id} ended without a result "
                                         f"(state {state or 'gone from the queue'})"})
                finished = True
            if finished:
                del pending[i]
                done += 1
                if progress is not None:
                    status = "completed" if (run_dir / "summary.json").exists() else "failed"
                    progress(done, len(tasks), point, {"status": status})
        if pending and deadline is not None and time.time() > deadline:
            for i, job_id in pending.items():
                write_json(out / "failures" / f"{tasks[i][1].name}.json",
                           {"status": "failed", "error": f"slurm job {job_id} did not finish "
                            f"within wait_s={options['wait_s']}"})
            break
        if pending:
            time.sleep(poll)
