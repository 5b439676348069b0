"""Slurm jobs for a run: render the job template ``launcher/templates/train.sbatch`` (package
data), check what reaches it, submit, query, cancel.

``sslscale submit`` turns a config + flags into :class:`JobSpec`, checks every value
(:func:`check`), renders the jinja2 template (:func:`render`), writes the script and a snapshot
of the resolved config into ``RUN_DIR/slurm/``, and submits with ``sbatch --parsable``. The job
runs one ``srun`` task per rank; preemption and requeue live in the script itself (the exit
codes of ``sslscale.exits``: 75 after a preemption save and crashes up to ``max_failures`` are
requeued; ``scancel``, ``cancel --save``, a config error and a finished run are not), so a
requeued job needs nothing from this process. ``RUN_DIR/slurm/`` holds ``train.sbatch``, ``config.yaml``, ``job_id``, the job's log
``<name>-<jobid>.out`` (appended across requeues), ``attempts.jsonl`` (one start / end event
per attempt, written by the script) and, after ``sslscale cancel --save``, ``stop``.

Safety: values that end up on ``#SBATCH`` lines (job name, partition, paths, extra options ...)
must match a strict character set, since sbatch does not parse them as shell; values in the
script body go through ``shlex.quote``. A job name such as ``x; rm -rf ~`` is refused with an
error naming the key or flag it came from. Pure Python: imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import jinja2

from launcher.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from sslscale import exits

# package data (pyproject.toml), so that a plain `pip install` (not editable) can submit too
TEMPLATE = Path(__file__).resolve().parent / "templates" / "train.sbatch"
SRUN_WAIT_S = 300  # after the first rank exits, the others get this long before srun ends them
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_LIST = re.compile(r"[A-Za-z0-9_.,-]+")  # partition / account / qos (comma lists allowed)
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|*()\[\]:-]+")
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE")
_PATH = re.compile(r"/[A-Za-z0-9_./+@:,=-]*")  # absolute, and plain enough for an #SBATCH line
_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_./+@:,=%*()\[\]-]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NO_SPACE = re.compile(r"[^\s]+")
# #SBATCH options the template sets itself; give them through sslscale's flags instead.
RESERVED = {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time",
            "partition", "account", "qos", "constraint", "signal", "requeue", "no-requeue",
            "open-mode", "output", "error", "chdir", "ntasks", "array"}


class SlurmError(ValueError):
    """A value cannot go into a job script, or sbatch / squeue / scontrol / scancel failed."""


@dataclass(frozen=True)
class JobSpec:
    """What the job asks of Slurm. ``sources`` maps a field to where its value came from (a
    flag or a config key), for error messages."""

    job_name: str
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0  # 0: no --gpus-per-node line (CPU clusters)
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    container_image: str | None = None  # pyxis / enroot: srun --container-image
    container_mounts: str | None = None  # default: the working dir and the run dir
    signal_grace: int = 120  # seconds before the time limit that SIGUSR1 comes
    max_failures: int = 3  # crashes / stalls / lost nodes requeued per job before it ends FAILED
    master_port: int = 0  # rendezvous port; 0: from the job id, moved to a free one at each start
    sbatch_extra: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def spec_from(slurm_cfg: Any, job_name: str, flags: Mapping[str, Any]) -> JobSpec:
    """A ``JobSpec`` from the config's ``slurm`` section and ``flags`` (field -> value or None;
    a flag that is not None wins over the config key of the same name)."""
    values: dict[str, Any] = {"job_name": job_name, "time": slurm_cfg.time,
                              "signal_grace": slurm_cfg.signal_grace_s,
                              "max_failures": slurm_cfg.max_failures,
                              "master_port": slurm_cfg.master_port,
                              "sbatch_extra": tuple(slurm_cfg.sbatch_extra),
                              "env": tuple(sorted((str(k), str(v)) for k, v in slurm_cfg.env.items()))}
    sources = {"job_name": "key 'name'", "time": "key 'slurm.time'",
               "signal_grace": "key 'slurm.signal_grace_s'", "sbatch_extra": "key 'slurm.sbatch_extra'",
               "max_failures": "key 'slurm.max_failures'", "master_port": "key 'slurm.master_port'",
               "env": "key 'slurm.env'"}
    for key in ("partition", "account", "qos", "constraint"):
        values[key], sources[key] = getattr(slurm_cfg, key), f"key 'slurm.{key}'"
    names = {f.name for f in fields(JobSpec)}
    for key, value in flags.items():
        if key not in names:
            raise KeyError(f"unknown JobSpec field {key!r}")
        if value is not None:
            values[key], sources[key] = value, "--" + key.replace("_", "-")
    if values.get("gpus_per_node") and "ntasks_per_node" not in {k for k, v in flags.items() if v is not None}:
        values["ntasks_per_node"] = values["gpus_per_node"]  # one rank per GPU
    return JobSpec(**values, sources=sources)


def _where(spec: JobSpec, key: str) -> str:
    return spec.sources.get(key, "--" + key.replace("_", "-"))


def _match(spec: JobSpec, key: str, pattern: re.Pattern, hint: str) -> None:
    value = getattr(spec, key)
    if value is not None and not pattern.fullmatch(str(value)):
        raise SlurmError(f"{_where(spec, key)} = {value!r} cannot go into a job script: {hint}")


def time_limit_s(limit: str) -> int | None:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None for UNLIMITED / INFINITE."""
    if limit in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    return sum(p * u for p, u in zip(parts, units))


def check(spec: JobSpec) -> None:
    """``SlurmError`` naming the flag or config key of the first value that is out of range or
    could change the script's meaning (whitespace, quotes, ``;``, ``$``, newlines ...)."""
    for key, low in (("nodes", 1), ("ntasks_per_node", 1), ("gpus_per_node", 0), ("signal_grace", 1),
                     ("max_failures", 0)):
        if getattr(spec, key) < low:
            raise SlurmError(f"{_where(spec, key)} must be >= {low}, got {getattr(spec, key)}")
    if spec.master_port != 0 and not 1024 <= spec.master_port <= 65535:
        raise SlurmError(f"{_where(spec, 'master_port')} must be 0 (derived from the job id) or a port "
                         f"in 1024-65535, got {spec.master_port}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise SlurmError(f"{_where(spec, 'cpus_per_task')} must be >= 1, got {spec.cpus_per_task}")
    _match(spec, "job_name", _NAME, "use 1-128 letters, digits and . _ + - (starting with a letter or digit)")
    for key in ("partition", "account", "qos"):
        _match(spec, key, _LIST, "use letters, digits, _ . - and commas")
    _match(spec, "constraint", _CONSTRAINT, "use Slurm feature syntax without spaces")
    _match(spec, "time", _TIME, "use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    limit = time_limit_s(spec.time)
    if limit is not None and spec.signal_grace >= limit:
        raise SlurmError(f"{_where(spec, 'signal_grace')} = {spec.signal_grace} s is not shorter than "
                         f"the time limit {spec.time} ({_where(spec, 'time')}): the job would get its "
                         "stop signal at the start")
    _match(spec, "container_image", _NO_SPACE, "no whitespace")
    _match(spec, "container_mounts", _NO_SPACE, "no whitespace")
    for line in spec.sbatch_extra:
        if not _OPTION.fullmatch(line):
            raise SlurmError(f"{_where(spec, 'sbatch_extra')}: {line!r} cannot go into a job script: "
                             "use a plain '--option' or '--option=value' (no spaces, quotes or shell syntax)")
        if line[2:].split("=")[0] in RESERVED:
            raise SlurmError(f"{_where(spec, 'sbatch_extra')}: {line!r} is set by sslscale; use the "
                             f"--{line[2:].split('=')[0]} flag of `sslscale submit` instead")
    for name, _ in spec.env:
        if not _ENV_NAME.fullmatch(name):
            raise SlurmError(f"{_where(spec, 'env')}: {name!r} is not a valid environment variable name")
        if name == "MASTER_PORT":
            raise SlurmError(f"{_where(spec, 'env')}: MASTER_PORT is set by sslscale (the job script "
                             "exports it): use key 'slurm.master_port' instead")


def check_path(path: Path, what: str) -> Path:
    """``path`` made absolute; ``SlurmError`` naming ``what`` if it is unfit for an #SBATCH line."""
    path = path.resolve()
    if not _PATH.fullmatch(str(path)):
        raise SlurmError(f"{what} = {str(path)!r} cannot go into a job script: use a path of letters, "
                         "digits and _ . / + @ : , = - (no spaces or shell syntax)")
    return path


def render(spec: JobSpec, *, run_dir: Path, workdir: Path, config: Path, python: str,
           template: Path = TEMPLATE) -> str:
    """The job script for ``spec``. ``run_dir`` / ``workdir`` must be absolute paths that passed
    :func:`check_path`; ``config`` is the resolved config the ranks load; ``python`` the
    interpreter they run (``python`` inside a container). Calls :func:`check` first."""
    check(spec)
    if not template.is_file():
        raise SlurmError(f"job template {template} not found (it ships in the sslscale wheel as "
                         "launcher/templates/train.sbatch: reinstall sslscale)")
    if not python or "\n" in python:
        raise SlurmError(f"--python = {python!r}: give an interpreter path")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template.parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    mounts = spec.container_mounts or ",".join(dict.fromkeys([str(workdir), str(run_dir)]))
    options = {k: getattr(spec, k) for k in ("partition", "account", "qos", "constraint")}
    return env.get_template(template.name).render(
        job_name=spec.job_name, nodes=spec.nodes, ntasks_per_node=spec.ntasks_per_node,
        gpus_per_node=spec.gpus_per_node, cpus_per_task=spec.cpus_per_task, time=spec.time,
        options=options, signal_grace=spec.signal_grace, log_dir=check_path(run_dir / "slurm", "run_dir"),
        workdir=workdir, sbatch_extra=spec.sbatch_extra, run_dir=run_dir, config=config,
        port_base=SLURM_PORT_BASE, port_span=SLURM_PORT_SPAN, master_port=spec.master_port,
        omp_threads=1, env=dict(spec.env),
        preempted_code=exits.PREEMPTED, usage_code=exits.USAGE, interrupted_code=exits.INTERRUPTED,
        max_failures=spec.max_failures, srun_wait=SRUN_WAIT_S,
        container_image=spec.container_image, container_mounts=mounts, python=python)


FLAGS = ("job_name", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "time", "partition",
         "account", "qos", "constraint", "container_image", "container_mounts", "signal_grace",
         "max_failures")


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec
    script: str  # the rendered job script
    run_dir: Path  # absolute
    config: Path  # RUN_DIR/slurm/config.yaml: the resolved config the ranks load
    script_path: Path  # RUN_DIR/slurm/train.sbatch


def prepare(cfg: Any, flags: Mapping[str, Any], *, workdir: Path, python: str | None = None) -> PreparedJob:
    """Check and render the job for the resolved config ``cfg`` (its ``name``, ``run_dir`` and
    ``slurm`` section) and ``flags`` (a subset of :data:`FLAGS`; None = not given). ``python``
    defaults to this interpreter, or ``python`` inside a container. Writes nothing."""
    spec = spec_from(cfg.slurm, cfg.name, flags)
    check(spec)
    run_dir = check_path(Path(workdir) / cfg.run_dir, "key 'run_dir'")
    workdir = check_path(Path(workdir), "the working directory")
    config = run_dir / "slurm" / "config.yaml"
    if python is None:
        python = "python" if spec.container_image else sys.executable
    script = render(spec, run_dir=run_dir, workdir=workdir, config=config, python=python)
    return PreparedJob(spec, script, run_dir, config, run_dir / "slurm" / "train.sbatch")


def _run(cmd: list[str]) -> str:
    """stdout of ``cmd``; ``SlurmError`` with its stderr if it fails or is not installed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: is this a Slurm login node? "
                         "(try slurm/local-cluster.sh start)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd)} did not answer within 60 s") from None
    if done.returncode:
        raise SlurmError(f"{' '.join(map(shlex.quote, cmd))} failed ({done.returncode}): "
                         f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm"


def job_id_of(run_dir: str | Path) -> int:
    """The id of the last job submitted for ``run_dir``; ``FileNotFoundError`` if none was."""
    path = slurm_dir(run_dir) / "job_id"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no Slurm job was submitted for this run dir ({path} missing)")
    return int(path.read_text().strip())


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, RunTime, NodeList, ExitCode,
    ...); ``{}`` once Slurm has forgotten the job (after MinJobAge)."""
    try:
        out = _run(["scontrol", "show", "job", "--oneliner", str(job_id)])
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return {}
        raise
    return dict(re.findall(r"(\w+)=(\S*)", out))


def ensure_no_active_job(run_dir: Path) -> None:
    """``SlurmError`` if the last job submitted for ``run_dir`` is still queued or running: two
    jobs would write one run dir (and a new snapshot would change the running job's config)."""
    id_file = slurm_dir(run_dir) / "job_id"
    if id_file.is_file():
        old = int(id_file.read_text().strip())
        state = job_info(old).get("JobState", "")
        if state in ACTIVE_STATES:
            raise SlurmError(f"run_dir {run_dir} already has job {old} ({state}): "
                             f"`sslscale cancel {run_dir}` first, or use another run_dir")


def submit_script(job: PreparedJob, save_config: Callable[[Path], None]) -> int:
    """Write ``job``'s script and, through ``save_config(path)``, its config snapshot into
    ``RUN_DIR/slurm/``, ``sbatch`` it and record the job id in ``RUN_DIR/slurm/job_id``.
    ``SlurmError`` (before writing anything) if a job of this run dir is still active."""
    ensure_no_active_job(job.run_dir)
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    (job.script_path.parent / "stop").unlink(missing_ok=True)  # left by `cancel --save` of an old job
    save_config(job.config)
    job.script_path.write_text(job.script)
    job_id = int(_run(["sbatch", "--parsable", str(job.script_path)]).strip().split(";")[0])
    (slurm_dir(job.run_dir) / "job_id").write_text(f"{job_id}\n")
    return job_id


def attempts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The start / end events the job script appended to ``RUN_DIR/slurm/attempts.jsonl``."""
    path = slurm_dir(run_dir) / "attempts.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status(run_dir: str | Path) -> dict[str, Any]:
    """The run's job as Slurm sees it, its attempts and its latest checkpoint tag."""
    job_id = job_id_of(run_dir)
    info = job_info(job_id)
    latest = Path(run_dir) / "checkpoints" / "latest"
    logs = sorted(slurm_dir(run_dir).glob(f"*-{job_id}.out"))
    return {"job_id": job_id, "state": info.get("JobState", "UNKNOWN (no longer known to Slurm)"),
            "reason": info.get("Reason"), "restarts": int(info.get("Restarts", 0) or 0),
            "run_time": info.get("RunTime"), "time_limit": info.get("TimeLimit"),
            "nodes": info.get("NodeList"), "exit_code": info.get("ExitCode"),
            "latest_checkpoint": latest.read_text().strip() if latest.is_file() else None,
            "log": str(logs[0]) if logs else None, "attempts": attempts(run_dir)}


def cancel(run_dir: str | Path, save: bool = False) -> int:
    """Stop the run's job; returns its id. Plain: ``scancel`` (Slurm sends SIGTERM to every
    process of the job, the run keeps its last complete checkpoint, a cancelled job is never
    requeued). ``save``: a running job gets SIGUSR1 as on preemption, so the ranks save at the
    next step and exit, and the stop file ``RUN_DIR/slurm/stop`` tells the job script not to
    requeue; a pending job is simply cancelled."""
    job_id = job_id_of(run_dir)
    if save and job_info(job_id).get("JobState") == "RUNNING":
        (slurm_dir(run_dir) / "stop").write_text(f"{job_id}\n")
        _run(["scancel", "--signal=USR1", "--full", str(job_id)])
    else:
        _run(["scancel", str(job_id)])
    return job_id
