"""The launch scripts: syntax, shellcheck when installed, and tpu_pod.sh's DRY_RUN plan (no
gcloud runs), argument quoting across the ssh hop, and its refusals; slurm.sbatch and run.sh
with stand-ins for srun and the venv's python."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
CLASSES = "--config.sample.classes=(207, 360)"
POD = dict(NAME="dgae", ZONE="us-east5-a", ACCELERATOR="v5p-32", RUNTIME="v2-alpha-tpuv5",
           BUCKET="gs://my-bucket")


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_gcloud(tmp_path):
    """A bin directory whose gcloud only leaves a marker file: it must never be called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_called"
    _stub(bin_dir, "gcloud", f'echo "$@" >> {shlex.quote(str(marker))}\nexit 1\n')
    return bin_dir, marker


def _pod(bin_dir, args=(), **env):
    full = {k: v for k, v in os.environ.items() if k not in POD and k not in
            ("NODE_COUNT", "SPOT", "RESERVED", "DRY_RUN", "WORKDIR", "TFDS_DATA_DIR", "PROJECT",
             "TPU_FLAGS", "VALID_UNTIL_DURATION", "INCEPTION_WEIGHTS",
             "DGAE_JAX_INCEPTION_WEIGHTS")}
    full.update(env, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env=full,
                          capture_output=True, text=True, timeout=60)


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"run.sh", "tpu_pod.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_pod_dry_run_multislice(fake_gcloud):
    bin_dir, marker = fake_gcloud
    result = _pod(bin_dir, ["--config=configs/f16.py", CLASSES], **POD, DRY_RUN="1",
                  NODE_COUNT="2", SPOT="1")
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), f"gcloud was run: {marker.read_text()}"
    out = result.stdout
    assert "--node-count=2" in out and "--node-prefix=dgae" in out and "--node-id" not in out
    assert "--spot" in out and "--reserved" not in out
    assert "--config.mesh.dcn_data=2" in out

    # Every printed command parses back as a shell line; one ssh per slice, to all its workers.
    commands = [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]
    ssh = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert [c[5] for c in ssh] == ["dgae-0", "dgae-1"]
    scp = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    assert [c[6] for c in scp] == ["dgae-0:dgae_jax.tgz", "dgae-1:dgae_jax.tgz"]
    for command in ssh:
        assert "--worker=all" in command
        remote = next(a for a in command if a.startswith("--command="))[len("--command="):]
        # What the worker's shell receives, word by word: the argument arrives unchanged.
        words = shlex.split(remote)
        assert CLASSES in words
        run = words[words.index("launch/run.sh") + 1:]
        assert run == ["--workdir=gs://my-bucket/runs/dgae-f16", "--config=configs/f16.py",
                       CLASSES, "--config.mesh.dcn_data=2"]
        assert "TFDS_DATA_DIR=gs://my-bucket/tfds" in words
    # The remote command is also shown on its own, exactly as sent.
    shown = [line[2:] for line in out.splitlines() if line.startswith("# mkdir")]
    assert shown == [remote]


def test_tpu_pod_dry_run_single_slice_keeps_node_id(fake_gcloud):
    bin_dir, marker = fake_gcloud
    result = _pod(bin_dir, ["--config=configs/f16.py", "--mode=cache_latents",
                            "--config.cache.dir=gs://my-bucket/latents/f16"],
                  **POD, DRY_RUN="1", RESERVED="1", VALID_UNTIL_DURATION="6h")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    out = result.stdout
    assert "--node-id=dgae" in out and "--node-count" not in out
    assert "--reserved" in out and "--valid-until-duration=6h" in out
    assert "dcn_data" not in out
    assert "--mode=cache_latents" in out
    ssh = [shlex.split(line) for line in out.splitlines() if "tpu-vm ssh" in line]
    assert [c[5] for c in ssh] == ["dgae"]


def test_tpu_pod_explicit_workdir_and_dcn_are_kept(fake_gcloud):
    bin_dir, _ = fake_gcloud
    result = _pod(bin_dir, ["--config=configs/ldm_f16.py", "--workdir=gs://b/runs/ldm",
                            "--config.mesh.dcn_data=1"], **POD, DRY_RUN="1", NODE_COUNT="3")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "tpu-vm ssh dgae-2" in line)
    words = shlex.split(next(a for a in shlex.split(line) if a.startswith("--command="))[10:])
    assert words[words.index("launch/run.sh") + 1:] == [
        "--config=configs/ldm_f16.py", "--workdir=gs://b/runs/ldm", "--config.mesh.dcn_data=1"]


def test_tpu_pod_missing_name(fake_gcloud):
    bin_dir, marker = fake_gcloud
    env = {k: v for k, v in POD.items() if k != "NAME"}
    result = _pod(bin_dir, ["--config=configs/f16.py"], **env, DRY_RUN="1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NAME" in lines[0], result.stderr
    assert not marker.exists()


def test_tpu_pod_refuses_spot_and_reserved(fake_gcloud):
    bin_dir, marker = fake_gcloud
    result = _pod(bin_dir, ["--config=configs/f16.py"], **POD, DRY_RUN="1", SPOT="1",
                  RESERVED="1")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "SPOT" in result.stderr and "RESERVED" in result.stderr
    assert not marker.exists()


def test_tpu_pod_refuses_bad_node_count(fake_gcloud):
    bin_dir, _ = fake_gcloud
    result = _pod(bin_dir, [], **POD, DRY_RUN="1", NODE_COUNT="two")
    assert result.returncode != 0 and "NODE_COUNT" in result.stderr


def _checkout(tmp_path):
    """A copy of launch/ next to a hand-made venv whose python prints its arguments and the
    variables the scripts set."""
    checkout = tmp_path / "checkout"
    shutil.copytree(LAUNCH, checkout / "launch")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    _stub(checkout / ".venv" / "bin", "python",
          'printf "arg=%s\\n" "$@"\n'
          'echo "JAX_EXTRA=${JAX_EXTRA:-}"\necho "DEVICES=${JAX_LOCAL_DEVICE_IDS:-}"\n')
    return checkout


def test_run_sh_uses_existing_venv(tmp_path):
    checkout = _checkout(tmp_path)
    result = subprocess.run(["bash", str(checkout / "launch" / "run.sh"), CLASSES, "--mode=eval"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == ["arg=-m", "arg=dgae_jax.main", f"arg={CLASSES}",
                                              "arg=--mode=eval"]


def test_slurm_sbatch_starts_run_sh_per_node(tmp_path):
    checkout = _checkout(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun stand-in: records its options, then runs the command once (as one node would).
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do echo "srun $1"; shift; done\nexec "$@"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(checkout),
               SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="32", SLURM_JOB_ID="42")
    result = subprocess.run(["bash", str(checkout / "launch" / "slurm.sbatch"),
                             "--config=configs/f16.py", "--workdir=/nfs/runs/f16", CLASSES],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "srun --ntasks-per-node=1" in out and "srun --cpus-per-task=32" in out
    assert [line[4:] for line in out if line.startswith("arg=")][2:] == [
        "--config=configs/f16.py", "--workdir=/nfs/runs/f16", CLASSES]
    assert "JAX_EXTRA=cuda12" in out
    assert "DEVICES=0,1,2,3,4,5,6,7" in out
    sbatch = (LAUNCH / "slurm.sbatch").read_text()
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=",
                   "--time=", "--signal=TERM@", "--requeue"):
        assert f"#SBATCH {option}" in sbatch


def test_run_sh_installs_the_venv_once_when_hosts_start_together(tmp_path):
    """Three hosts on one shared checkout: one installs (under the lock), the others wait."""
    checkout = tmp_path / "checkout"
    shutil.copytree(LAUNCH, checkout / "launch")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "install.log"
    # python3 -m venv .venv stand-in: a venv whose pip is slow and logs what it installs.
    _stub(bin_dir, "python3",
          'mkdir -p .venv/bin\n'
          f'printf \'#!/usr/bin/env bash\\nsleep 1\\necho "$*" >> {log}\\n\' > .venv/bin/pip\n'
          'printf \'#!/usr/bin/env bash\\necho ran "$@"\\n\' > .venv/bin/python\n'
          'chmod +x .venv/bin/pip .venv/bin/python\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SETUP_ONLY="1",
               JAX_EXTRA="cuda12")
    hosts = [subprocess.Popen(["bash", str(checkout / "launch" / "run.sh")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for host in hosts:
        out, err = host.communicate(timeout=60)
        assert host.returncode == 0, err
        assert out == ""  # SETUP_ONLY: nothing is run
    assert log.read_text().splitlines() == ["install -q --upgrade pip",
                                            "install -q -e . jax[cuda12]"]
    assert (checkout / ".venv" / ".installed").read_text().strip() == "jax[cuda12]"


FAKE_GCLOUD = r'''#!PYTHON
"""gcloud stand-in: the queued resource is ACTIVE at once; scp copies into WORKERS/<node>/, ssh
runs --command with bash in WORKERS/<node>/ (as a worker's login shell would)."""
import os, pathlib, shutil, subprocess, sys
args = sys.argv[1:]
workers = pathlib.Path(os.environ["FAKE_WORKERS"])
with open(workers / "gcloud.log", "a") as log:
    log.write(repr(args) + "\n")
verb = " ".join(args[:4])
if verb == "compute tpus queued-resources describe":
    if not any(a.startswith("--format") for a in args):
        sys.exit(1)  # does not exist yet
    print("ACTIVE")
elif verb == "compute tpus queued-resources create":
    pass
elif verb == "compute tpus tpu-vm scp":
    src, dest = args[4], args[5]
    node, path = dest.split(":", 1)
    (workers / node).mkdir(exist_ok=True)
    shutil.copy(src, workers / node / path)
elif verb == "compute tpus tpu-vm ssh":
    node = args[4]
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    home = workers / node
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home,
                            env=dict(os.environ, HOME=str(home))).returncode)
else:
    sys.exit(f"unexpected gcloud {args}")
'''


def test_tpu_pod_runs_every_slice_with_the_arguments_intact(tmp_path):
    """Not a dry run: a stand-in gcloud copies the tarball into fake worker homes and runs the
    ssh command with bash there; each worker's venv python (made by hand) records its argv."""
    workers = tmp_path / "workers"
    workers.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    for node in ("dgae-0", "dgae-1"):
        venv = workers / node / "dgae_jax" / ".venv" / "bin"
        venv.mkdir(parents=True)
        _stub(venv, "python", f'printf "%s\\n" "$@" > {shlex.quote(str(workers / node))}/argv\n'
                              'echo "$TFDS_DATA_DIR" > ../tfds\n'
                              'cp "$DGAE_JAX_INCEPTION_WEIGHTS" ../weights\n')
    weights = tmp_path / "inception-2015-12-05.npz"
    weights.write_text("weights")
    args = ["--config=configs/ldm_f16.py", "--mode=sample", CLASSES,
            "--config.cache.dir=gs://my-bucket/latents/f16"]
    env = {**POD, "NODE_COUNT": "2", "FAKE_WORKERS": str(workers), "TMPDIR": str(tmp_path),
           "INCEPTION_WEIGHTS": str(weights)}
    result = _pod(bin_dir, args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("dgae-0", "dgae-1"):
        argv = (workers / node / "argv").read_text().splitlines()
        assert argv == ["-m", "dgae_jax.main", "--workdir=gs://my-bucket/runs/dgae-ldm_f16",
                        *args, "--config.mesh.dcn_data=2"]
        assert (workers / node / "tfds").read_text().strip() == "gs://my-bucket/tfds"
        assert (workers / node / "weights").read_text() == "weights"  # copied with the code
        assert (workers / node / "dgae_jax" / "launch" / "run.sh").is_file()
        assert (workers / node / "dgae_jax" / "configs" / "f16.py").is_file()
    calls = (workers / "gcloud.log").read_text()
    assert "'--node-count=2'" in calls and "'--node-prefix=dgae'" in calls
