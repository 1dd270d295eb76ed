"""`ftl slurm` and `ftl status` against a real SLURM cluster (slurm/local-cluster/start.sh).

Two slurmd "nodes" on this machine (n1, n2 on 127.0.10.x): jobs really go through sbatch,
srun, the time-limit signal, requeue and restart. The reference for every loss sequence
is one process with gradient accumulation 2 (the same global batch of 8), run in-process.
Without a cluster these tests skip, unless FTL_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli.main import main
from launcher.dist import slurm as slurm_lib
from launcher.recipe.schema import SlurmCfg
from launcher.train.distributed import compare_ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
TOL = 1e-5
HOSTILE = "a b 'c' \"d\" $(touch PWNED1) `touch PWNED2`; touch PWNED3 & |x"


def cluster_up() -> str | None:
    """None when a 2-node cluster answers, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (start one: slurm/local-cluster/start.sh)"
    done = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip()}"
    idle = sum(
        int(n)
        for n, state in (line.split() for line in done.stdout.splitlines())
        if state in ("idle", "mix", "alloc")
    )
    return None if idle >= 2 else f"need 2 nodes, sinfo says {done.stdout.strip()!r}"


@pytest.fixture(scope="session")
def cluster() -> None:
    why = cluster_up()
    if why is None:
        return
    if os.environ.get("FTL_REQUIRE_SLURM") == "1":
        pytest.fail(f"FTL_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


def ftl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli.main", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def user_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for n in needles:
        assert n in done.stderr, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama, chat_data) -> Path:
    d = tmp_path_factory.mktemp("slurm")
    path = d / "recipe.yaml"
    path.write_text(
        f"""\
task: causal_lm
model:
  name_or_path: {tiny_llama}
data:
  format: chat
  train: {chat_data["train"]}
  max_length: 64
train:
  max_steps: {STEPS}
  micro_batch_size: 4
  global_batch_size: 8
  lr: 1.0e-3
  warmup_steps: 2
  log_every: 1
  fast_dropout: false
distributed:
  strategy: ddp
output:
  dir: {d / "unused"}
slurm:
  gpus_per_node: 0
  time: "00:15:00"
"""
    )
    return path


@pytest.fixture(scope="module")
def reference_run(base, tmp_path_factory) -> Path:
    """One process, accumulation 2: the same global batch of 8 as 2 ranks x 4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    rc = main(["train", str(base), "-o", "distributed.strategy=none", "-o", f"output.dir={out}"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> list[float]:
    return train_losses(reference_run)


def records(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run, "train")]


def submit(base: Path, run: Path, *args: str, cwd: Path) -> str:
    done = ftl("slurm", str(base), "-o", f"output.dir={run}", *args, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads((run / "slurm.json").read_text())["jobs"][-1]["job_id"]
    assert f"submitted job {job}" in done.stdout
    return job


def status(run: Path, cwd: Path) -> dict:
    done = ftl("status", str(run), "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(
    run: Path,
    cwd: Path,
    done_states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
    timeout: float = 300,
) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = status(run, cwd)
        if info["job"]["state"] in done_states:
            return info
        time.sleep(1)
    log = next(run.glob("logs/slurm-*.out"), None)
    raise AssertionError(f"job still {info['job']}: {log.read_text()[-4000:] if log else ''}")


def log_text(run: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(run.glob("logs/slurm-*.out")))


def assert_same(a: list[float], b: list[float], run: Path) -> None:
    assert len(a) == len(b) == STEPS, log_text(run)[-4000:]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL, (a, b)


# -- against the cluster -------------------------------------------------------------------
@pytest.mark.slurm
def test_one_node_job_runs_to_completion_and_hostile_values_stay_literal(cluster, base, tmp_path):
    """Spaces, quotes, $(...), backticks, ; and & in the run folder, the job name and an
    exported variable reach the job as text: nothing runs, everything is where it says."""
    data = tmp_path / f"data {HOSTILE.replace('/', '_')}.jsonl"
    shutil.copy(yaml.safe_load(base.read_text())["data"]["train"], data)
    run = tmp_path / f"run {HOSTILE}"
    recipe = tmp_path / "hostile.yaml"
    text = base.read_text().replace(
        "gpus_per_node: 0", f"gpus_per_node: 0\n  env:\n    FTL_T: {json.dumps(HOSTILE)}"
    )
    recipe.write_text(text)
    job = submit(
        recipe,
        run,
        "--job-name",
        HOSTILE,
        "-o",
        f"data.train={data}",
        "-o",
        "distributed.strategy=none",
        "-o",
        "train.max_steps=4",
        cwd=tmp_path,
    )
    info = wait_for(run, tmp_path)
    assert info["job"]["state"] == "COMPLETED", log_text(run)[-4000:]
    assert info["last_step"] == 4 and info["starts"] == 1 and info["restarts"] == 0
    assert info["summary"]["status"] == "completed"
    assert (run / "model" / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    # the name SLURM holds, and the variable the script exports, are the literal text
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert f"JobName={HOSTILE}" in shown.stdout
    script = (run / "job.sbatch").read_text()
    got = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(grep "^export FTL_T=" "$1")"; printf %s "$FTL_T"',
            "x",
            str(run / "job.sbatch"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert got.stdout == HOSTILE and not list(tmp_path.rglob("PWNED*"))
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --open-mode=append" in script


@pytest.mark.slurm
def test_two_nodes_usr1_checkpoints_requeues_and_resumes_exactly(
    cluster, base, reference, tmp_path
):
    """2 nodes x 1 process (DDP) are one world of 2; USR1 mid-run (what SLURM sends before
    the time limit) -> every rank checkpoints -> the job requeues itself -> resumes -> the
    losses equal an uninterrupted single-process run's."""
    run = tmp_path / "run"
    job = submit(base, run, "--nodes", "2", "-o", "distributed.timeout_minutes=7", cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(records(run, "train")) >= 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(log_text(run)[-4000:])
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)
    info = wait_for(run, tmp_path, timeout=400)
    log = log_text(run)
    assert info["job"]["state"] == "COMPLETED", log[-4000:]
    assert "USR1: every rank checkpoints" in log and "requeueing" in log
    starts = records(run, "start")
    assert [s["restart"] for s in starts] == [0, 1], starts
    assert {s["slurm_job_id"] for s in starts} == {job}
    stopped_at = records(run, "stop")[0]["step"]
    assert 2 <= stopped_at < STEPS
    assert starts[1]["resumed_from"].endswith(f"step-{stopped_at:08d}")
    record = json.loads((run / "distributed.json").read_text())
    assert record["world_size"] == 2
    assert record["collective_timeout_s"] == 7 * 60  # the recipe's, as torch holds it
    assert record["preflight"]["allreduce_bus_gbps"] > 0
    assert (info["restarts"], info["starts"], info["last_step"]) == (1, 2, STEPS)
    assert_same(train_losses(run), reference, run)


@pytest.mark.slurm
def test_zero3_on_two_nodes_survives_kill_9_during_a_checkpoint(
    cluster, base, reference, tmp_path, deepspeed_ops
):
    """ZeRO-3 over 2 nodes; rank 0 is killed with SIGKILL while it writes a checkpoint. The
    cut checkpoint is never used: the retry resumes from the previous complete one and
    the run still ends with the uninterrupted losses."""
    run = tmp_path / "run"
    submit(
        base,
        run,
        "--nodes",
        "2",
        "-o",
        "distributed.strategy=zero3",
        "-o",
        "train.save_every=4",
        "-o",
        "slurm.retries_on_failure=1",
        "-o",
        "distributed.timeout_minutes=9",
        cwd=tmp_path,
    )
    ckpts = run / "checkpoints"
    killed_during = None
    deadline = time.time() + 300
    while time.time() < deadline and killed_during is None:
        for tmp in ckpts.glob(".tmp-step-*") if ckpts.is_dir() else []:
            step = int(tmp.name.split("-")[-1])
            if step >= 8:  # a complete checkpoint (step 4) exists before it (12 steps)
                os.kill(rank_pid(0), signal.SIGKILL)
                killed_during = step
                break
        time.sleep(0.005)
    assert killed_during is not None, log_text(run)[-4000:]
    info = wait_for(run, tmp_path, timeout=400)
    log = log_text(run)
    assert info["job"]["state"] == "COMPLETED", log[-4000:]
    assert "retry 1 of 1" in log
    starts = records(run, "start")
    assert [s["restart"] for s in starts] == [0, 1], starts
    resumed = int(starts[1]["resumed_from"].rsplit("-", 1)[-1])
    assert resumed < killed_during  # the cut checkpoint was not used
    record = json.loads((run / "distributed.json").read_text())
    assert (record["strategy"], record["collective_timeout_s"]) == ("zero3", 9 * 60)
    assert_same(train_losses(run), reference, run)


def rank_pid(rank: int) -> int:
    """pid of the `ftl train` process with RANK=rank (both "nodes" live on this machine)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launcher.cli.main" in cmd and b"train" in cmd and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process")


@pytest.mark.slurm
def test_partition_the_cluster_rejects_shows_sbatch_message_and_writes_nothing(
    cluster, base, tmp_path
):
    run = tmp_path / "run"
    done = ftl("slurm", str(base), "-o", f"output.dir={run}", "--partition", "nosuch", cwd=tmp_path)
    user_error(done, "sbatch refused the job", "invalid partition", "nosuch")
    assert not run.exists()


# -- without a cluster ---------------------------------------------------------------------
def test_dry_run_needs_no_sbatch_and_submission_without_it_is_a_clear_error(base, tmp_path):
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin/false-only"}
    run = tmp_path / "run"
    done = ftl(
        "slurm",
        str(base),
        "-o",
        f"output.dir={run}",
        "--nodes",
        "2",
        "--dry-run",
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and not run.exists()
    done = ftl("slurm", str(base), "-o", f"output.dir={run}", cwd=tmp_path, env=env)
    user_error(done, "sbatch is not on PATH", "--dry-run")
    assert not run.exists()


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--nodes", "0"], ["--nodes", "at least 1"]),
        (
            ["--gpus-per-node", "4", "-o", "distributed.num_processes=2"],
            ["--gpus-per-node", "distributed.num_processes", "2 process(es) per node"],
        ),
        (
            ["--nodes", "2", "-o", "distributed.strategy=none"],
            ["distributed.strategy", "-o distributed.strategy=ddp"],
        ),
        (["-o", "slurm.env.WANDB_API_KEY=abc"], ["slurm.env.WANDB_API_KEY", "secret"]),
        (["-o", "slurm.sbatch_args=[mail]"], ["slurm.sbatch_args[0]", "--name=value"]),
        (
            ["-o", "slurm.retries_on_failure=2", "-o", "slurm.requeue=false"],
            ["slurm.retries_on_failure", "requeue"],
        ),
    ],
)
def test_bad_job_settings(base, tmp_path, args, needles):
    run = tmp_path / "run"
    done = ftl("slurm", str(base), "-o", f"output.dir={run}", "--dry-run", *args, cwd=tmp_path)
    user_error(done, *needles)
    assert not run.exists()


def test_run_folder_that_cannot_be_written(base, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"  # never reached: the folder check comes first
    fake.write_text("#!/bin/sh\necho should-not-run >&2; exit 1\n")
    fake.chmod(0o755)
    done = ftl("slurm", str(base), "-o", f"output.dir={blocker / 'run'}", cwd=tmp_path, env=env)
    user_error(done, "cannot write the run folder", "output.dir")


def test_a_folder_holding_a_run_needs_resume_or_overwrite(base, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    user_error(
        ftl("slurm", str(base), "-o", f"output.dir={run}", cwd=tmp_path, env=env),
        "already holds a run",
        "--resume",
        "--overwrite",
    )
    user_error(
        ftl("slurm", str(base), "-o", f"output.dir={run}", "--resume", cwd=tmp_path, env=env),
        "no complete checkpoint",
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_rendered_script_is_valid_bash_and_quotes_every_value(tmp_path):
    s = SlurmCfg(
        partition="gpu a",
        account="x;y",
        nodes=3,
        gpus_per_node=8,
        mem="200G",
        exclusive=True,
        job_name=HOSTILE,
        env={"V": HOSTILE},
        sbatch_args=["--mail-type=END", "--comment=$(id)"],
        port=29400,
    )
    job = slurm_lib.Job(
        run_dir=tmp_path / f"r {HOSTILE}",
        recipe_file=tmp_path / "r.yaml",
        workdir=tmp_path,
        python=sys.executable,
        slurm=s,
        processes_per_node=8,
        strategy="zero3",
        source="x.yaml",
    )
    text = slurm_lib.render(job)
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    lines = text.splitlines()
    for want in (
        "#SBATCH --partition='gpu a'",
        "#SBATCH --account='x;y'",
        "#SBATCH --nodes=3",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --mem=200G",
        "#SBATCH --mail-type=END",
        "#SBATCH --comment='$(id)'",
        "port=29400",
    ):
        assert want in lines, want
    assert '--machine-rank "$SLURM_NODEID"' in text  # expanded on each node, not here
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text


def test_status_of_a_run_without_slurm(reference_run, tmp_path, capsys):
    assert main(["status", str(reference_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["job"] is None and (info["last_step"], info["total_steps"]) == (STEPS, STEPS)
    assert (info["starts"], info["restarts"]) == (1, 0)
    assert info["summary"]["status"] == "completed"
    assert main(["status", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_script_stops_when_the_head_node_does_not_resolve(base, tmp_path):
    """The real batch script, run by bash with SLURM's variables; `scontrol` names a head
    node nobody can resolve: exit 2 with the reason, and srun is never started (no
    fallback to localhost)."""
    run = tmp_path / "run"
    done = ftl(
        "slurm", str(base), "-o", f"output.dir={run}", "--nodes", "2", "--dry-run", cwd=tmp_path
    )
    script = tmp_path / "job.sbatch"
    script.write_text(done.stdout.split("\n", 1)[1])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho no-such-node-ftl-test\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path / 'srun-ran'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "no-such-node-ftl-test,n9",
        "SLURM_JOB_NUM_NODES": "2",
    }
    got = subprocess.run(
        ["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert got.returncode == 2, got.stderr
    assert "first node 'no-such-node-ftl-test'" in got.stderr and "not falling back" in got.stderr
    assert not (tmp_path / "srun-ran").exists()


# -- preflight: ranks that differ stop before the model loads ------------------------------
def test_compare_ranks_names_each_difference():
    a = {"host": "n1", "python": "3.11.2", "torch": "2.13.0", "recipe": "aaa"}
    b = {**a, "host": "n2", "torch": "2.12.0"}
    assert compare_ranks([a, dict(a)]) == []
    (line,) = compare_ranks([a, b])
    assert "torch differs" in line and "2.13.0 on rank 0 (n1)" in line and "rank 1 (n2)" in line


def two_machines(recipes: list[Path], out: Path, prefixes=([], []), envs=({}, {})) -> list[str]:
    """`ftl launch` as machines 0 and 1 of one world on loopback; both must exit 2 without
    a traceback. Returns each machine's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "launcher.cli.main",
            "launch",
            str(recipes[rank]),
            "--num-processes=1",
            "--num-machines=2",
            f"--machine-rank={rank}",
            "--main-process-ip=127.0.0.1",
            f"--main-process-port={port}",
            "-o",
            f"output.dir={out}",
        ]
        procs.append(
            subprocess.Popen(
                [*prefixes[rank], *cmd],
                env={**os.environ, **envs[rank]},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(0.5)  # machine 0 checks that its port is free before binding it
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outs, strict=True):
        assert p.returncode == 2, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    return outs


def test_preflight_stops_mismatched_machines_with_one_clear_message(base, tmp_path):
    """Machine 1 has another PEFT installed and a stale copy of the recipe."""
    fake = tmp_path / "other-site"
    (fake / "peft-0.0.1.dist-info").mkdir(parents=True)
    (fake / "peft-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: peft\nVersion: 0.0.1\n"
    )
    stale = tmp_path / "stale.yaml"
    stale.write_text(base.read_text().replace("lr: 1.0e-3", "lr: 2.0e-3"))
    out = tmp_path / "run"
    outs = two_machines([base, stale], out, envs=({}, {"PYTHONPATH": str(fake)}))
    text = outs[0]
    assert "do not match" in text
    assert "peft differs between ranks" in text and "0.0.1 on rank 1" in text
    assert "the recipe (hash) differs" in text
    assert "[preflight] rank 0/2" in text and "[preflight] rank 1/2" in outs[1]
    assert not (out / "metrics.jsonl").exists()


def can_hide_a_folder() -> bool:
    """True when this machine can give one process its own view of a folder (root)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "x", "/mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not can_hide_a_folder(), reason="needs unshare -m (root) to fake a node")
def test_preflight_refuses_a_run_folder_the_nodes_do_not_share(base, tmp_path):
    """Machine 1 runs in its own mount namespace with an empty tmpfs over the folder that
    holds the run: like a node-local disk. Checkpoints would be split across machines, so
    both stop before loading the model, naming the rank that cannot see the folder."""
    shared = tmp_path / "shared"
    shared.mkdir()
    hide = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "bash",
        "-c",
        'mount -t tmpfs node-local "$1" && shift && exec "$@"',
        "_",
        str(shared),
    ]
    for text in two_machines([base, base], shared / "run", prefixes=([], hide)):
        assert "rank 1" in text and "cannot see the run folder" in text, text[-3000:]
    assert list(shared.iterdir()) == []  # the probe is gone, nothing was written
