"""bench/compare.py's runs as cluster jobs, through submitit (a maintained Slurm client).

    python bench/compare.py --env maze2d-medium --algos td3bc --preset paper --launcher slurm \\
        --slurm-partition gpu --slurm-gpus 1 --slurm-time-min 1440   # submits the jobs and returns
    (the same command again)                                         # reports the jobs; once all are done, the A/B

Each run is one job that runs the same train.py command line as the local path. The dataset and the
pretrained models come first, in one job the runs depend on (Slurm: afterok), so that no run trains
them itself. A job decides on its node whether to resume: when its run folder holds a checkpoint.
Before a time-out or a pre-emption Slurm sends SIGUSR2 (submitit asks for it with --signal); train.py
saves a checkpoint between two gradient steps, as on Ctrl-C, and exits 140; the job then hands the
signal back to submitit, which requeues it, and the requeued job resumes bit-exactly.

``--launcher submitit-local`` runs the same jobs as local processes (submitit's LocalExecutor, which
has no dependencies, so the preparing job is waited for before the runs are submitted): what the tests
use, and a way to try this path without a cluster. This path has not yet run on a real Slurm cluster.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import submitit

ROOT = Path(__file__).resolve().parent.parent
REQUEUE_CODES = {128 + signal.SIGUSR1, 128 + signal.SIGUSR2}  # train.py's exit code after a cluster's signal


class TrainJob:
    """One train.py run as a job: resumes when its folder holds a checkpoint; requeued after a cluster's signal."""

    def __init__(self, argv: list[str], folder: str):
        self.argv, self.folder = argv, folder

    def __call__(self) -> dict:
        sys.path.insert(0, str(ROOT))
        import train

        resume = (Path(self.folder) / "checkpoint.pt").exists()  # decided here, on the node, at every (re)start
        try:
            return train.main([*self.argv, *(["--resume"] if resume else [])])
        except SystemExit as exc:
            if exc.code in REQUEUE_CODES:  # the checkpoint is on disk: let submitit's handler requeue the job
                os.kill(os.getpid(), exc.code - 128)
            raise

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the signal: requeue the same run (its state is the checkpoint on disk)."""
        return submitit.helpers.DelayedSubmission(self)


class PrepareJob:
    """The dataset, and DyDiff's pretrained models for the DyDiff runs' flags (bench/pretrain.py), built once."""

    def __init__(self, argv: list[str], models: bool):
        self.argv, self.models = argv, models

    def __call__(self) -> None:
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        import pretrain
        import train
        from data import load_dataset
        from rebuild import build_dataset

        if self.models:
            pretrain.main(self.argv)
        else:
            a = train.parse_args(self.argv)
            load_dataset(a.env, a.dataset_id, a.dataset_steps, build=build_dataset)


def make_executor(args, folder: Path):
    if args.launcher == "slurm":
        ex = submitit.SlurmExecutor(folder)
        ex.update_parameters(time=args.slurm_time_min, gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus,
                             **({"partition": args.slurm_partition} if args.slurm_partition else {}),
                             additional_parameters=dict(kv.split("=", 1) for kv in args.slurm_flags.split()))
    else:
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=args.slurm_time_min)
    return ex


def job_of(args, folder: Path, job_id: str):
    return (submitit.SlurmJob if args.launcher == "slurm" else submitit.LocalJob)(folder=folder, job_id=job_id)


def launch(args, runs: list[tuple[str, Path, list[str]]], prepare: PrepareJob, jobs_file: Path) -> list[str]:
    """Submit each run (name, folder, train.py argv) that has neither a summary nor a job still queued or
    running; returns the names of the runs not finished yet (an empty list: all are done)."""
    folder = (jobs_file.parent / "jobs").resolve()
    ex = make_executor(args, folder)
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    waiting, todo = [], []
    for name, run_folder, argv in runs:
        if (run_folder / "summary.json").exists():
            continue
        waiting.append(name)
        if name not in jobs or job_of(args, folder, jobs[name]).done():  # never submitted, or ended without a summary
            todo.append((name, run_folder, argv))
    if todo:
        # the jobs import train.py and bench/ from this checkout, and find the run folders by absolute paths
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
        prep = ex.submit(prepare)
        print(f"submitted the dataset and pretraining job {prep.job_id}", flush=True)
        if args.launcher == "slurm":
            ex.update_parameters(dependency=f"afterok:{prep.job_id}")
        else:
            prep.result()  # the local executor has no dependencies: wait for it
        for name, run_folder, argv in todo:
            job = ex.submit(TrainJob(argv, str(run_folder)))
            jobs[name] = job.job_id
            print(f"submitted {name} as job {job.job_id}", flush=True)
        jobs_file.parent.mkdir(parents=True, exist_ok=True)
        jobs_file.write_text(json.dumps(jobs, indent=2))
    return waiting
