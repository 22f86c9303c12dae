"""Resources validation, the sbatch script submitit writes from them, and the local/debug executors.

    .venv/bin/python -m pytest -q tests/test_executors.py        # no cluster needed

SLURM commands are faked by small scripts put first on PATH (as submitit's own tests do).
"""
import os
import stat
import sys

import pytest
import submitit

from slurm.backend import make_executor
from slurm.executors import Resources, ResourcesError


def _double(x):
    return 2 * x


def _fake_commands(tmp_path, monkeypatch, **scripts):
    """Put executable shell scripts named like SLURM commands first on PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, field, value", [
    ({"nodes": 0}, "nodes", "0"),
    ({"gpus_per_node": -1}, "gpus_per_node", "-1"),
    ({"gpus_per_node": 1.5}, "gpus_per_node", "1.5"),
    ({"gpus_per_node": True}, "gpus_per_node", "True"),
    ({"tasks_per_node": 0}, "tasks_per_node", "0"),
    ({"cpus_per_task": 0}, "cpus_per_task", "0"),
    ({"mem_gb": 0}, "mem_gb", "0"),
    ({"mem_gb": "32G"}, "mem_gb", "'32G'"),
    ({"timeout_min": 0}, "timeout_min", "0"),
    ({"timeout_min": "60"}, "timeout_min", "'60'"),
    ({"partition": "gpu a100"}, "partition", "'gpu a100'"),
    ({"account": ""}, "account", "''"),
    ({"timeout_min": 2, "signal_delay_s": 120}, "signal_delay_s", "120"),
    ({"setup": "module load cuda"}, "setup", "'module load cuda'"),
    ({"additional_parameters": {"time": "10"}}, "additional_parameters", "'time'"),
    ({"additional_parameters": {"gpus-per-node": 2}}, "additional_parameters", "'gpus-per-node'"),
    ({"additional_parameters": {"mail-type": ["FAIL"]}}, "additional_parameters['mail-type']", "['FAIL']"),
])
def test_invalid_resources_name_the_field_the_value_and_a_fix(kwargs, field, value):
    with pytest.raises(ResourcesError) as err:
        Resources(**kwargs)
    message = str(err.value)
    assert f"Resources.{field}={value} is invalid: " in message
    assert len(message.split("is invalid: ", 1)[1]) > 10, "the message must say how to fix it"


@pytest.mark.unit
def test_defaults_one_task_per_gpu_and_a_signal_delay_inside_short_limits():
    assert Resources().tasks_per_node == 1
    assert Resources(gpus_per_node=4).tasks_per_node == 4
    assert Resources(gpus_per_node=4, tasks_per_node=1).tasks_per_node == 1
    assert Resources(timeout_min=120).signal_delay_s == 180  # time to checkpoint a 7B adapter and its optimizer
    assert Resources(timeout_min=2).signal_delay_s == 30  # 180 s would signal a 2-minute job at once


@pytest.mark.unit
def test_requeue_counts_are_the_orchestrators_now():
    with pytest.raises(ResourcesError, match="max_num_timeout was removed.*retries: {on: \\[timeout\\]"):
        Resources.from_dict({"max_num_timeout": 3})


@pytest.mark.unit
def test_from_dict_rejects_unknown_keys_and_lists_the_valid_ones():
    assert Resources.from_dict({"gpus_per_node": 2, "partition": "gpu"}).tasks_per_node == 2
    with pytest.raises(ResourcesError, match=r"\['gpu'\].*valid keys are: partition, nodes, gpus_per_node"):
        Resources.from_dict({"gpu": 2})
    again = Resources.from_dict(Resources(gpus_per_node=2, setup=["true"]).to_dict())
    assert again == Resources(gpus_per_node=2, setup=["true"])


def _sbatch_text(tmp_path, monkeypatch, resources, job_name="trial-3"):
    _fake_commands(tmp_path, monkeypatch, srun="exit 0")
    executor = make_executor("slurm", tmp_path / "jobs", resources, job_name=job_name)
    # submitit's own rendering of the batch script for the executor's current parameters
    return executor._executor._make_submission_file_text("python -m my.command", "uid")


def test_sbatch_script_carries_every_resource(tmp_path, monkeypatch):
    resources = Resources(
        partition="gpu", gpus_per_node=4, cpus_per_task=8, mem_gb=64, timeout_min=180, account="proj42",
        qos="high", constraint="a100", additional_parameters={"mail-type": "FAIL", "exclusive": True},
        setup=["module load cuda/12.1", "source /opt/venv/bin/activate"])
    text = _sbatch_text(tmp_path, monkeypatch, resources)
    directives = {line for line in text.splitlines() if line.startswith("#SBATCH")}
    for expected in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                     "--mem=64GB", "--time=180", "--account=proj42", "--qos=high", "--constraint=a100",
                     "--mail-type=FAIL", "--exclusive", "--job-name=trial-3", "--nodes=1", "--signal=USR2@180"):
        assert f"#SBATCH {expected}" in directives, f"{expected} missing from:\n{text}"
    lines = text.splitlines()
    setup_at = lines.index("module load cuda/12.1")
    assert lines[setup_at + 1] == "source /opt/venv/bin/activate"
    assert setup_at < next(i for i, line in enumerate(lines) if line.startswith("srun ")), "setup runs before srun"


def test_sbatch_script_leaves_unset_options_to_the_cluster(tmp_path, monkeypatch):
    text = _sbatch_text(tmp_path, monkeypatch, Resources(timeout_min=2))
    for absent in ("--partition", "--gpus-per-node", "--account", "--qos", "--mem=", "--constraint"):
        assert f"#SBATCH {absent}" not in text
    assert "#SBATCH --signal=USR2@30" in text


def test_slurm_executor_submits_through_sbatch(tmp_path, monkeypatch):
    record = tmp_path / "sbatch-args"
    _fake_commands(tmp_path, monkeypatch, srun="exit 0",
                   sbatch=f'cp "$1" {record}.sh; echo "$@" > {record}; echo "Submitted batch job 4242"')
    executor = make_executor("slurm", tmp_path / "jobs", Resources(partition="debug", timeout_min=5))
    job = executor.submit(_double, 21)
    assert job.job_id == "4242"
    assert "#SBATCH --partition=debug" in (tmp_path / "sbatch-args.sh").read_text()
    assert job.paths.submitted_pickle.exists()


def test_auto_picks_slurm_only_when_the_controller_answers(tmp_path, monkeypatch):
    _fake_commands(tmp_path, monkeypatch, srun="exit 0", sbatch="exit 0", sinfo="exit 1")
    assert make_executor("auto", tmp_path / "a").cluster == "local"
    _fake_commands(tmp_path, monkeypatch, sinfo="echo gpu")
    assert make_executor("auto", tmp_path / "b").cluster == "slurm"


@pytest.mark.unit
def test_unknown_kind_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="auto, slurm, local, debug"):
        make_executor("slurmm", tmp_path)


@pytest.mark.parametrize("kind", ["debug", "local"])
def test_local_and_debug_executors_run_a_function(tmp_path, kind):
    executor = make_executor(kind, tmp_path / kind, Resources(timeout_min=2, setup=["module load ignored"]))
    jobs = [executor.submit(_double, x) for x in (1, 2)]
    assert [job.result() for job in jobs] == [2, 4]


def test_local_executor_reports_a_failing_function(tmp_path):
    job = make_executor("local", tmp_path, Resources(timeout_min=2)).submit(_double, None)
    with pytest.raises(submitit.core.utils.FailedJobError, match="TypeError"):
        job.result()


@pytest.mark.parametrize("resources", [
    Resources(partition="gpu", gpus_per_node=4, cpus_per_task=8, mem_gb=64, timeout_min=180, account="proj42",
              qos="high", constraint="a100", additional_parameters={"mail-type": "FAIL"}, setup=["module load x"]),
    Resources(timeout_min=2),
    Resources(mem_gb=0.5, tasks_per_node=1, gpus_per_node=2),
])
def test_the_dry_run_preview_is_the_script_submitit_writes(tmp_path, monkeypatch, resources):
    from slurm.executors import sbatch_preview
    real = _sbatch_text(tmp_path, monkeypatch, resources, job_name="trial-0")
    preview = sbatch_preview(resources, tmp_path / "jobs", "trial-0")
    def lines(text):  # the command srun runs differs by design (the helper above renders a dummy one)
        return [line.split(".err ")[0] if line.startswith("srun ") else line for line in text.splitlines()]
    assert lines(preview) == lines(real)
    assert f"{sys.executable} -u -m submitit.core._submit" in preview
