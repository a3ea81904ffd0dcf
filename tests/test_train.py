"""The distillation harness (train/): end to end, resume, torchrun, data, configuration errors.

Everything runs at a tiny scale (12 px shapes1000 images, one image per class, a few steps) so that
the file finishes in well under three minutes on two cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from train import checkpoint
from train.data import (
    SHAPES1000_CLASSES, DataError, SeededTransform, Shapes1000, build_data, shapes1000_attributes,
    shapes1000_class,
)
from train.distill import TAU_METRIC_K, ConfigError, main, parse_config, run
from train_helpers import read_csv, teacher_ckpt  # noqa: F401  (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = ["--image-size", "12", "--shapes-train-per-class", "1", "--shapes-val-per-class", "1",
             "--batch-size", "100", "--no-progress", "--warmup-epochs", "0.2"]
TINY = TINY_DATA + ["--threads", "1"]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_tiny_end_to_end_with_teacher_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    status = main(TINY + ["--train-teacher", "--teacher-arch", "cifar_resnet8", "--teacher-epochs",
                          "1", "--epochs", "1", "--max-steps", "3", "--out", out])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| student" in printed and "| teacher" in printed  # the summary table
    for phase in ("teacher", "student"):
        for name in ("metrics.csv", "curves.png", "last.pt"):
            assert os.path.isfile(os.path.join(out, phase, name)), (phase, name)
    assert os.path.isfile(os.path.join(out, "summary.md"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    (row,) = read_csv(os.path.join(out, "student", "metrics.csv"))
    assert row["step"] == "3"
    for key in ("train_ce", "train_kd", "train_rank", "val_top1", "val_top5", "val_tau",
                "images_per_s", "rank_time_share"):
        assert row[key] != "" and float(row[key]) == float(row[key]), key  # present, not NaN
    assert 0.0 <= float(row["train_rank"]) <= 2.0
    assert -1.0 <= float(row["val_tau"]) <= 1.0
    assert 0.0 < float(row["rank_time_share"]) < 1.0
    (teacher_row,) = read_csv(os.path.join(out, "teacher", "metrics.csv"))
    assert teacher_row["train_kd"] == "" and teacher_row["val_tau"] == ""  # not computed: empty


def test_teacher_checkpoint_loads_and_weights_apply(tmp_path, teacher_ckpt):
    out = str(tmp_path / "run")
    summaries = run(parse_config(TINY + ["--teacher-ckpt", teacher_ckpt, "--epochs", "1",
                                         "--max-steps", "2", "--ce-weight", "0",
                                         "--kd-weight", "0", "--out", out]))
    (row,) = read_csv(os.path.join(out, "student", "metrics.csv"))
    assert row["train_ce"] == "" and row["train_kd"] == "" and row["train_rank"] != ""
    assert float(row["train_loss"]) == pytest.approx(float(row["train_rank"]))
    assert summaries[-1]["steps"] == 2


def test_demo_runs_at_tiny_scale(tmp_path, capsys):
    from train import demo

    out = str(tmp_path / "demo")
    assert demo.main(["--out", out, "--image-size", "12", "--train-per-class", "1",
                      "--val-per-class", "1", "--teacher-arch", "cifar_resnet8",
                      "--teacher-epochs", "1", "--epochs", "1", "--max-steps", "2",
                      "--batch-size", "100", "--seeds", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("CE + KD", "CE + KD + Kendall", "kd_rank - kd, val_top1", "95% t-interval",
                  "t = 12.706, 1 dof", "load average"):
        assert label in printed, label
    for name in ("comparison.png", "summary.md", "results.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = read_csv(os.path.join(out, "results.csv"))
    assert [(r["seed"], r["arm"]) for r in rows] == [
        ("0", "teacher"), ("0", "kd"), ("0", "kd_rank"), ("1", "kd"), ("1", "kd_rank")]
    assert all(r["val_tau"] != "" for r in rows[1:]) and rows[0]["val_tau"] == ""
    for seed in (0, 1):
        for arm in ("kd", "kd_rank"):
            assert os.path.isfile(os.path.join(out, f"seed{seed}", arm, "metrics.csv"))


def test_demo_seeds_share_the_teacher_and_arms_share_the_seed(tmp_path):
    """Within a seed both arms start from the same weights and see the same images in the same
    order; another seed changes all three; the teacher is trained once."""
    from train import demo

    out = str(tmp_path / "demo")
    assert demo.main(["--out", out, "--image-size", "12", "--train-per-class", "1",
                      "--val-per-class", "1", "--teacher-arch", "cifar_resnet8",
                      "--teacher-epochs", "1", "--epochs", "1", "--max-steps", "1",
                      "--batch-size", "100", "--seeds", "2", "--rank-weight", "0",
                      "--no-progress"]) == 0
    # With rank weight 0 both arms compute the same loss: identical seeds give identical results.
    final = {(seed, arm): checkpoint.load(os.path.join(out, f"seed{seed}", arm, "last.pt"))
             for seed in (0, 1) for arm in ("kd", "kd_rank")}
    for name, tensor in final[(0, "kd")]["model"].items():
        assert torch.equal(tensor, final[(0, "kd_rank")]["model"][name]), name
    assert any(not torch.equal(tensor, final[(1, "kd")]["model"][name])
               for name, tensor in final[(0, "kd")]["model"].items())
    assert sorted(os.listdir(out)).count("teacher") == 1


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_resume_matches_an_uninterrupted_run_bitwise(tmp_path, teacher_ckpt):
    """Stop a run mid-epoch (and after a periodic checkpoint), resume it: bitwise the same end.

    Bitwise is the right bar here: the resumed process restores the exact model, optimizer,
    scheduler and random states, the data order comes from (seed, epoch) and the augmentation from
    per-sample seeds, and every op runs on the same CPU with one thread and the same shapes, so each
    floating-point operation is repeated exactly. Any difference means lost state.
    """
    common = TINY + ["--teacher-ckpt", teacher_ckpt, "--epochs", "2"]  # 10 steps per epoch
    whole = str(tmp_path / "whole")
    run(parse_config(common + ["--out", whole]))

    parts = str(tmp_path / "parts")
    first = run(parse_config(common + ["--out", parts, "--max-steps", "13", "--ckpt-every", "4"]))
    assert first[-1]["steps"] == 13 and not first[-1]["complete"]
    second = run(parse_config(common + ["--out", parts, "--resume"]))
    assert second[-1]["steps"] == 20 and second[-1]["complete"]

    expected = checkpoint.load(os.path.join(whole, "student", "final.pt"))
    resumed = checkpoint.load(os.path.join(parts, "student", "final.pt"))
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert expected["scheduler"] == resumed["scheduler"]
    assert torch.equal(expected["rng"][0]["torch"], resumed["rng"][0]["torch"])
    for row_whole, row_parts in zip(expected["history"], resumed["history"]):
        for key in ("train_loss", "train_ce", "train_kd", "train_rank", "val_top1", "val_tau"):
            assert row_whole[key] == row_parts[key], key


def test_resume_with_changed_options_is_refused(tmp_path, teacher_ckpt):
    out = str(tmp_path / "run")
    common = TINY + ["--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--out", out]
    run(parse_config(common + ["--max-steps", "2"]))
    with pytest.raises(ConfigError, match="rank_weight"):
        run(parse_config(common + ["--resume", "--rank-weight", "0.5"]))


# ---------------------------------------------------------------------------------------------
# torchrun: 2 processes, gloo
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_gloo_step_with_torchrun(tmp_path, teacher_ckpt):
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "train.distill",
               *TINY_DATA, "--batch-size", "50", "--teacher-ckpt", teacher_ckpt, "--epochs", "1",
               "--max-steps", "2", "--out", out]  # no --threads: each process takes its share
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    (row,) = read_csv(os.path.join(out, "student", "metrics.csv"))
    assert row["step"] == "2" and float(row["train_rank"]) > 0
    state = checkpoint.load(os.path.join(out, "student", "last.pt"))
    assert len(state["rng"]) == 2  # every process's random state, for --resume


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_shapes1000_is_deterministic_and_splits_differ():
    first = Shapes1000("train", 1, 12, seed=3)
    again = Shapes1000("train", 1, 12, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, Shapes1000("train", 1, 12, seed=4).images)
    assert not torch.equal(first.images, Shapes1000("val", 1, 12, seed=3).images)
    assert len(first) == SHAPES1000_CLASSES and first.images.dtype == torch.uint8
    assert sorted(set(first.labels.tolist())) == list(range(SHAPES1000_CLASSES))


def test_shapes1000_class_is_the_attribute_triple():
    for label in (0, 1, 9, 10, 99, 100, 517, 999):
        assert shapes1000_class(*shapes1000_attributes(label)) == label
    assert shapes1000_attributes(517) == (5, 1, 7)


def test_augmentation_depends_on_seed_epoch_index_only():
    data = build_data("shapes1000", image_size=12, seed=5, shapes_train_per_class=1,
                      shapes_val_per_class=1)
    assert isinstance(data.train, SeededTransform)
    data.train.set_epoch(2)
    forward = [data.train[i][0] for i in range(20)]
    torch.manual_seed(999)  # the global random state must not matter ...
    backward = [data.train[i][0] for i in reversed(range(20))][::-1]  # ... nor the access order
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    state = torch.get_rng_state()
    data.train[0]
    assert torch.equal(state, torch.get_rng_state())  # and it is left untouched
    data.train.set_epoch(3)
    assert any(not torch.equal(forward[i], data.train[i][0]) for i in range(20))


def test_validation_tau_metric_is_kendalls_tau():
    from rkkd_kernels import kendall_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50), torch.randn(6, 50)
    student[0] = teacher[0] * 3 + 1  # same order: tau = 1
    student[1] = -teacher[1]  # reversed: tau = -1
    pairs = torch.sign(student[:, :, None] - student[:, None, :]) * torch.sign(
        teacher[:, :, None] - teacher[:, None, :])
    exact = pairs.sum((1, 2)) / (50 * 49)
    measured = 1 - kendall_loss(student, teacher, TAU_METRIC_K, hard_teacher=True, reduction="none")
    torch.testing.assert_close(measured, exact, atol=1e-6, rtol=0)
    assert measured[0] == pytest.approx(1.0) and measured[1] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# Bad configurations: a clear error before any training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--data", "mnist"], "--data must be one of"),
    (["--data", "imagenet"], "needs --data-dir"),
    (["--data", "cifar100", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--kd-weight", "1"], "needs a teacher"),
    (["--train-teacher", "--ce-weight", "-1"], "--ce-weight must be"),
    (["--ce-weight", "0", "--kd-weight", "0", "--rank-weight", "0"], "all loss weights are 0"),
    (["--train-teacher", "--rank-top-k", "1"], "--rank-top-k must be at least 2"),
    (["--train-teacher", "--teacher-ckpt", "x.pt"], "not both"),
    (["--train-teacher", "--arch", "resnet9000"], "--arch must be one of"),
    (["--train-teacher", "--temperature", "0"], "--temperature must be > 0"),
    (["--train-teacher", "--rank-k", "nan"], "--rank-k must be"),
    (["--train-teacher", "--rank-backend", "fortran"], "--rank-backend must be one of"),
    (["--train-teacher", "--epochs", "0"], "--epochs must be at least 1"),
    (["--teacher-ckpt", "/no/such/teacher.pt"], "does not exist"),
])
def test_bad_configuration_is_rejected(argv, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-").replace("+", r"\+")):
        parse_config(argv)


def test_yaml_config_with_command_line_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train-teacher: true\nrank_weight: 2.0\nepochs: 3\ntemperature: 2\n")
    cfg = parse_config(["--config", str(path), "--epochs", "5"])
    assert (cfg.train_teacher, cfg.rank_weight, cfg.epochs, cfg.temperature) == (True, 2.0, 5, 2.0)
    path.write_text("train_teacher: true\nrank_wieght: 2.0\n")
    with pytest.raises(ConfigError, match="unknown option 'rank_wieght'"):
        parse_config(["--config", str(path)])
    path.write_text("train_teacher: true\nepochs: many\n")
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        parse_config(["--config", str(path)])


def test_missing_or_malformed_data_folder_fails_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, expected in (("imagenet", "train"), ("cifar100", "CIFAR-100 not found")):
        out = tmp_path / f"out_{data}"
        status = main(["--data", data, "--data-dir", str(empty), "--train-teacher",
                       "--out", str(out), "--no-progress"])
        assert status == 2
        assert expected in capsys.readouterr().err
        assert not (out / "teacher").exists()  # nothing was trained
    (empty / "train" / "cat").mkdir(parents=True)  # train/ present, val/ missing
    with pytest.raises(DataError, match="val"):
        build_data("imagenet", str(empty))


def test_top_k_beyond_the_classes_is_rejected_before_training(tmp_path, teacher_ckpt):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="exceeds the 1000 classes"):
        run(parse_config(TINY + ["--teacher-ckpt", teacher_ckpt, "--rank-top-k", "1001",
                                 "--out", str(out)]))
    assert not (out / "student").exists()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"value": torch.ones(2)}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"value": lambda: None}, path)  # cannot be pickled
    assert torch.equal(checkpoint.load(path)["value"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
