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

from escapelab.config import SlurmOptions, config_to_dict
from escapelab.errors import EscapelabError
from escapelab.store import SweepDir

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


def run_slurm(tasks: list[tuple[Point, Path]], sweep: SweepDir, options: SlurmOptions,
              progress: Progress | None) -> None:
    """Submit `tasks` as one job array and wait (bounded) until each has ended."""
    try:
        import submitit
    except ImportError:
        raise EscapelabError("the slurm backend needs submitit: pip install "
                             "'escapelab[slurm]'") from None
    if shutil.which("sbatch") is None:
        raise EscapelabError("the slurm backend needs Slurm's sbatch on this machine")
    from escapelab.sweep import run_point

    executor = submitit.SlurmExecutor(folder=str(sweep.slurm_dir))
    params: dict[str, Any] = {"time": options.time_min, "cpus_per_task": options.cpus,
                              "array_parallelism": options.parallel,
                              "job_name": f"escapelab-{sweep.path.name}"}
    if options.partition:
        params["partition"] = options.partition
    if options.mem_gb:
        params["mem"] = f"{options.mem_gb}G"
    executor.update_parameters(**params)
    jobs = executor.map_array(run_point, [config_to_dict(p.config) for p, _ in tasks],
                              [str(d) for _, d in tasks], [options.cpus] * len(tasks))
    ids = [str(job.job_id) for job in jobs]
    deadline = time.time() + options.wait_s if options.wait_s else None
    poll = options.poll_s
    pending = dict(enumerate(ids))
    done = 0
    while pending:
        states = queue_states(list(pending.values()))
        for i, job_id in list(pending.items()):
            point, run_dir = tasks[i]
            run = sweep.run(run_dir.name)
            finished = run.finished or sweep.failure(run_dir.name) is not None
            state = states.get(job_id)
            if not finished and (state is None or state in ENDED):
                # Left the queue (or ended) without a result: the task died.
                time.sleep(min(poll, 1.0))  # let a just-written summary land
                if not run.finished:
                    sweep.write_failure(run_dir.name, f"slurm job {job_id} ended without a "
                                        f"result (state {state or 'gone from the queue'})")
                finished = True
            if finished:
                del pending[i]
                done += 1
                if progress is not None:
                    status = "completed" if run.finished else "failed"
                    progress(done, len(tasks), point, {"status": status})
        if pending and deadline is not None and time.time() > deadline:
            for i, job_id in pending.items():
                sweep.write_failure(tasks[i][1].name, f"slurm job {job_id} did not finish "
                                    f"within wait_s={options.wait_s}")
            break
        if pending:
            time.sleep(poll)
