"""Launch plans (`ftl launch --dry-run`), cluster variables and bad input: nothing starts."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import yaml

from launcher.cli.main import main
from launcher.dist import env as cluster_env
from launcher.dist.plan import (
    ACCELERATE_CONFIG,
    DEEPSPEED_CONFIG,
    MODEL_AUTOS,
    Cluster,
    build_plan,
    load_deepspeed_config,
)
from launcher.errors import UserError
from launcher.recipe import load_recipe

RECIPE = """\
model: {{name_or_path: some/model}}
data: {{format: chat, train: {train}}}
train: {{micro_batch_size: 4, max_grad_norm: 0.5, lr: 3.0e-4, precision: {precision}}}
distributed: {{strategy: {strategy}}}
output: {{dir: {out}}}
"""


@pytest.fixture
def make(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')

    def _make(strategy="ddp", precision="fp32", extra="", overrides=()):
        p = tmp_path / f"{strategy}.yaml"
        p.write_text(
            RECIPE.format(train=train, strategy=strategy, precision=precision, out=tmp_path / "o")
            + extra
        )
        return p, load_recipe(p, list(overrides))

    return _make


def plan(recipe, path="r.yaml", overrides=(), **cluster):
    return build_plan(recipe, str(path), list(overrides), Cluster(**cluster), python="PY")


def files(p):
    acc = yaml.safe_load(p.files[ACCELERATE_CONFIG])
    ds = json.loads(p.files[DEEPSPEED_CONFIG]) if DEEPSPEED_CONFIG in p.files else None
    return acc, ds


def test_ddp_on_cpu_avoids_the_single_process_traps(make):
    path, r = make("ddp")
    p = plan(r, path, ["train.lr=1e-3"], num_processes=2, cpus=8)
    acc, ds = files(p)
    assert ds is None and p.world_size == 2
    # accelerate's CPU modes (--cpu, MULTI_CPU) start ONE process; torchrun + this env var works
    assert acc["distributed_type"] == "MULTI_GPU" and acc["use_cpu"] is False
    assert p.env["ACCELERATE_USE_CPU"] == "true"
    assert p.env["OMP_NUM_THREADS"] == "4"
    assert p.env["FTL_WORLD_SIZE"] == "2" and p.env["FTL_STRATEGY"] == "ddp"
    assert p.argv[:5] == ["PY", "-m", "accelerate.commands.launch", "--config_file",
                          f"<launch-dir>/{ACCELERATE_CONFIG}"]  # fmt: skip
    assert p.argv[5:] == ["-m", "launcher.cli.main", "train", str(path), "-o", "train.lr=1e-3"]
    assert acc["num_processes"] == 2 and acc["num_machines"] == 1


def test_gpu_host_defaults_to_one_process_per_gpu(make):
    _, r = make("ddp", precision="bf16")
    p = plan(r, gpus=8)
    acc, _ = files(p)
    assert p.world_size == 8 and acc["num_processes"] == 8
    assert acc["mixed_precision"] == "bf16"
    assert "ACCELERATE_USE_CPU" not in p.env and "OMP_NUM_THREADS" not in p.env
    with pytest.raises(UserError, match="only 8 GPU"):
        plan(r, gpus=8, num_processes=9)


@pytest.mark.parametrize("strategy,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_are_filled_from_the_recipe(make, strategy, stage):
    _, r = make(strategy, precision="bf16", extra="", overrides=["train.grad_accum=3"])
    p = plan(r, num_processes=2, gpus=2)
    acc, ds = files(p)
    assert acc["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in acc
    assert acc["deepspeed_config"]["deepspeed_config_file"] == f"<launch-dir>/{DEEPSPEED_CONFIG}"
    assert acc["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert acc["deepspeed_config"]["zero3_init_flag"] is (stage == 3)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    # left "auto": only what accelerate fills from the model's hidden size at prepare time
    left = {k for k, v in ds["zero_optimization"].items() if v == "auto"}
    assert {f"zero_optimization.{k}" for k in left} <= MODEL_AUTOS
    assert "reduce_bucket_size" in left


def test_offload_fills_the_optimizer_and_unpins_memory_on_cpu(make):
    _, r = make("zero3_offload", overrides=["train.weight_decay=0.1"])
    _, cpu = files(plan(r, num_processes=2))
    _, gpu = files(plan(r, num_processes=2, gpus=2))
    assert cpu["optimizer"]["params"] == {
        "lr": 3e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.1,
    }
    z_cpu, z_gpu = cpu["zero_optimization"], gpu["zero_optimization"]
    assert z_cpu["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert z_gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z_cpu["overlap_comm"] is False and z_gpu["overlap_comm"] is True
    assert cpu["bf16"]["enabled"] is False


def test_fsdp2_plan(make):
    _, r = make("fsdp")
    acc, ds = files(plan(r, num_processes=4, gpus=4))
    assert ds is None and acc["distributed_type"] == "FSDP"
    f = acc["fsdp_config"]
    assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_global_batch_size_derives_accumulation_from_the_world(make):
    _, r = make("zero2", overrides=["train.global_batch_size=64"])
    for world, accum in ((1, 16), (2, 8), (8, 2), (16, 1)):
        p = plan(r, num_processes=world, gpus=16)
        assert f"grad accumulation {accum} x world {world}" in p.accounting
        if world > 1:
            assert files(p)[1]["gradient_accumulation_steps"] == accum
            assert files(p)[1]["train_batch_size"] == 64
    with pytest.raises(UserError, match="not a multiple") as e:
        plan(r, num_processes=3, gpus=3)
    assert "train.global_batch_size" in str(e.value)


def test_multi_node_plan(make):
    _, r = make("zero3")
    p = plan(r, num_processes=8, num_machines=4, machine_rank=2,
             main_process_ip="10.0.0.1", main_process_port=29400, gpus=8)  # fmt: skip
    acc, _ = files(p)
    assert p.world_size == 32
    assert (acc["num_processes"], acc["num_machines"], acc["machine_rank"]) == (32, 4, 2)
    assert (acc["main_process_ip"], acc["main_process_port"]) == ("10.0.0.1", 29400)
    assert acc["rdzv_backend"] == "static"


@pytest.mark.parametrize(
    "cluster,match",
    [
        (dict(num_machines=2, machine_rank=2, main_process_ip="h"), "machine rank 2 with 2"),
        (dict(num_machines=2, machine_rank=1), "address of machine 0"),
    ],
)
def test_impossible_clusters(make, cluster, match):
    _, r = make("ddp")
    with pytest.raises(UserError, match=match):
        plan(r, num_processes=1, **cluster)


def test_one_process_runs_ftl_train_directly(make):
    path, r = make("none")
    p = plan(r, path)
    assert p.argv == ["PY", "-m", "launcher.cli.main", "train", str(path)] and not p.files
    with pytest.raises(UserError, match="strategy is none but 2 processes"):
        plan(r, path, num_processes=2)


def test_users_deepspeed_config_must_agree_with_the_recipe(make, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 16,
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 3, "allgather_bucket_size": "auto"},
                "scheduler": {"type": "WarmupLR"},
                "fp16": {"enabled": True},
            }
        )
    )
    path, r = make("zero2", overrides=[f"distributed.deepspeed_config={own}"])
    with pytest.raises(UserError) as e:
        build_plan(r, str(path), [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=16" in msg and "train.micro_batch_size" in msg
    assert "stage 3" in msg and "zero2" in msg
    assert "scheduler" in msg and "fp16" in msg and "allgather_bucket_size" in msg


def test_users_deepspeed_config_with_autos_is_used(make, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                               "zero_optimization": {"stage": 2, "round_robin_gradients": True}}))  # fmt: skip
    _, r = make("zero2")
    p = build_plan(r, "r.yaml", [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip
    ds = files(p)[1]
    assert ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 4


def test_deepspeed_config_missing_or_not_json(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_deepspeed_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{'stage': 3,}")
    with pytest.raises(UserError, match="not valid JSON"):
        load_deepspeed_config(str(bad))


def test_slurm_and_torchrun_variables():
    assert cluster_env.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert cluster_env.first_host("node3") == "node3"
    assert cluster_env.first_host("a-b[001,004]") == "a-b001"
    f = cluster_env.from_environment(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NODEID": "3",
            "SLURM_JOB_NUM_NODES": "4",
            "SLURM_JOB_NODELIST": "gpu[10-13]",
        }  # fmt: skip
    )
    assert (f.source, f.num_machines, f.machine_rank, f.main_process_ip) == ("slurm", 4, 3, "gpu10")
    f = cluster_env.from_environment({"MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "1234",
                                      "NODE_RANK": "1", "NNODES": "2"})  # fmt: skip
    assert (f.source, f.num_machines, f.machine_rank, f.main_process_port) == (
        "torchrun",
        2,
        1,
        1234,
    )
    assert cluster_env.from_environment({}).source == ""


# -- the CLI ------------------------------------------------------------------------------


def test_dry_run_prints_command_env_and_configs(make, capsys):
    path, _ = make("zero3")
    assert main(["launch", str(path), "--num-processes", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "accelerate.commands.launch --config_file '<launch-dir>/accelerate.yaml'" in out
    assert "export FTL_WORLD_SIZE=2" in out
    assert '"stage": 3' in out and "distributed_type: DEEPSPEED" in out
    assert "global batch 8 = micro batch 4 x grad accumulation 1 x world 2" in out
    assert sys.executable in out


def test_cli_takes_cluster_facts_from_slurm_but_arguments_win(make, capsys, monkeypatch):
    path, _ = make("ddp")
    for k, v in {"SLURM_JOB_ID": "1", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_STEP_ID": "3",
                 "SLURM_JOB_NODELIST": "n[5-6]"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    assert main(["launch", str(path), "--num-processes", "1", "--dry-run"]) == 0
    acc = capsys.readouterr().out
    assert "machine_rank: 1" in acc and "main_process_ip: n5" in acc
    assert main(["launch", str(path), "--num-processes=1", "--machine-rank=0", "--dry-run"]) == 0
    assert "machine_rank: 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides,args,match",
    [
        (["distributed.strategy=zero4"], [], "distributed.strategy"),
        (["distributed.strategy=fsdp", "distributed.deepspeed_config=x.json"], [],
         "FSDP and DeepSpeed are both set"),
        (["distributed.strategy=fsdp", "quant.bits=8", "adapter.type=lora"], [],
         "cannot be sharded by FSDP2"),
        (["distributed.strategy=zero3", "distributed.deepspeed_config=missing.json"], [],
         "does not exist"),
        ([], ["--num-machines=2", "--machine-rank=5", "--main-process-ip=h"], "machine rank 5"),
        (["train.global_batch_size=12"], ["--num-processes=2"], "not a multiple"),
    ],
)  # fmt: skip
def test_bad_launches_exit_2_before_anything_starts(make, capsys, overrides, args, match):
    path, _ = make("ddp")
    o = [x for ov in overrides for x in ("-o", ov)]
    assert main(["launch", str(path), *o, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (path.parent / "o").exists()


def test_busy_main_port_is_refused(make, capsys):
    path, _ = make("ddp")
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["launch", str(path), "--num-processes=2", f"--main-process-port={port}"])
    assert rc == 2
    assert f"port {port} is already in use" in capsys.readouterr().err
    assert not (path.parent / "o").exists()


def test_launch_inside_a_launched_process_is_refused(make, capsys, monkeypatch):
    path, _ = make("ddp")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert "run `ftl train` instead" in capsys.readouterr().err


def test_a_process_outside_the_planned_world_refuses_to_train(chat_recipe, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    # what every silent single-process trap looks like from inside: the plan said 2, the
    # process is alone (e.g. `accelerate launch --cpu --num_processes 2` starts one)
    monkeypatch.setenv("FTL_WORLD_SIZE", "2")
    monkeypatch.setenv("FTL_STRATEGY", "ddp")
    rc = main(["train", str(chat_recipe), "-o", "distributed.strategy=ddp"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "planned a world of 2 processes but accelerate sees 1" in err
    assert "ftl launch" in err and "Traceback" not in err
    assert not (tmp_path / "chat-run").exists()


def test_planned_strategy_must_match_the_recipe(chat_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTL_WORLD_SIZE", "1")
    monkeypatch.setenv("FTL_STRATEGY", "zero3")
    assert main(["train", str(chat_recipe)]) == 2
    assert "planned strategy zero3 but the recipe says none" in capsys.readouterr().err


def test_one_process_deepspeed_still_runs_deepspeed(make):
    # ZeRO-Offload on one GPU is the point of offload: never silently drop it
    _, r = make("zero3_offload")
    p = plan(r, gpus=1, cpus=16)
    acc, ds = files(p)
    assert p.world_size == 1 and acc["distributed_type"] == "DEEPSPEED"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert p.env["OMP_NUM_THREADS"] == "16"  # DeepSpeed's CPU Adam is an OpenMP loop


def test_ranks_get_time_to_checkpoint_and_no_inherited_rank(make):
    _, r = make("ddp")
    p = plan(r, num_processes=2)
    assert int(p.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 300
    assert {"WORLD_SIZE", "RANK", "LOCAL_RANK"} <= set(p.unset)
    assert "unset WORLD_SIZE" in p.render()


def test_users_zero3_config_must_let_the_final_model_be_saved(make, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    _, r = make("zero3")
    p = build_plan(r, "r.yaml", [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip
    assert files(p)[1]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    own.write_text(json.dumps({"zero_optimization": {"stage": 3,
                   "stage3_gather_16bit_weights_on_model_save": False}}))  # fmt: skip
    with pytest.raises(UserError, match="final model could not be saved"):
        build_plan(r, "r.yaml", [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip


def test_optimizer_offload_refuses_a_non_adam_optimizer(make, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    )
    _, r = make("zero2", overrides=["train.optimizer=sgd"])
    with pytest.raises(UserError, match="replaced silently"):
        build_plan(r, "r.yaml", [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip


def test_stage3_autos_are_refused_below_stage_3(make, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}))
    _, r = make("zero2")
    with pytest.raises(UserError, match="sub_group_size"):
        build_plan(r, "r.yaml", [], Cluster(num_processes=2), python="PY",
                   deepspeed_config=load_deepspeed_config(str(own)))  # fmt: skip


def test_slurm_outside_a_step_or_with_many_tasks_per_node_is_refused(make, capsys, monkeypatch):
    f = cluster_env.from_environment(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "n[1-2]",
        }  # fmt: skip
    )
    assert "outside any job step" in f.problem
    f = cluster_env.from_environment(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_NODELIST": "n[1-2]",
        }  # fmt: skip
    )
    assert "8 tasks per node" in f.problem
    path, _ = make("ddp")
    for k, v in {"SLURM_JOB_ID": "9", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_JOB_NODELIST": "n[1-2]"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert "srun --ntasks-per-node=1" in capsys.readouterr().err


def test_kubeflow_variables():
    f = cluster_env.from_environment({"PET_MASTER_ADDR": "job-master-0", "PET_NNODES": "4",
                                      "PET_NODE_RANK": "2", "PET_MASTER_PORT": "23456"})  # fmt: skip
    assert (f.num_machines, f.machine_rank, f.main_process_ip, f.main_process_port) == (
        4, 2, "job-master-0", 23456)  # fmt: skip


@pytest.mark.parametrize("port", ["70000", "80"])
def test_bad_ports_are_user_errors(make, capsys, port):
    path, _ = make("ddp")
    rc = main(["launch", str(path), "--num-processes=2", f"--main-process-port={port}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and port in err


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit"])
def test_zero_accepts_the_recipes_client_optimizer(make, optimizer):
    _, r = make("zero2", overrides=[f"train.optimizer={optimizer}"])
    _, ds = files(plan(r, num_processes=2))
    # DeepSpeed asserts on an optimizer outside its tested list unless told otherwise
    assert ds.get("zero_allow_untested_optimizer", False) is (optimizer != "adamw")
