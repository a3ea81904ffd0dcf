"""The harness's solver options, recipes, pretrained teachers, and the demo's statistics.

Tiny scale as in test_train.py: 12 px shapes1000, one image per class, a few steps.
"""

from __future__ import annotations

import math
import os
import urllib.error

import pytest
import torch

from train import checkpoint
from train.config import Config, ConfigError, parse_config, recipe_names
from train.distill import main, run
from train.loop import lr_factor
from train.models import build_model
from train.study import paired_difference, t_quantile
from train_helpers import read_csv, teacher_ckpt  # noqa: F401  (a fixture)

TINY = ["--image-size", "12", "--shapes-train-per-class", "1", "--shapes-val-per-class", "1",
        "--no-progress", "--threads", "1"]


def _message(text: str) -> str:
    """A regular expression matching ``text`` literally."""
    import re

    return re.escape(text)


# ---------------------------------------------------------------------------------------------
# Learning rate schedules, Nesterov, the global batch size
# ---------------------------------------------------------------------------------------------


def test_step_schedule_drops_by_gamma_at_each_milestone_epoch():
    cfg = Config(schedule="step", milestones=[2, 4], lr_gamma=0.1, warmup_epochs=0, epochs=6)
    factor = lr_factor(cfg, epochs=6, steps_per_epoch=10)
    assert [factor(s) for s in (0, 19)] == [1.0, 1.0]
    assert factor(20) == pytest.approx(0.1) and factor(39) == pytest.approx(0.1)
    assert factor(40) == pytest.approx(0.01) and factor(59) == pytest.approx(0.01)
    warm = lr_factor(Config(schedule="step", milestones=[2], warmup_epochs=0.5), 6, 10)
    assert [warm(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_cosine_schedule_is_unchanged():
    factor = lr_factor(Config(warmup_epochs=0.5), epochs=2, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.2) and factor(4) == pytest.approx(1.0)
    assert factor(5) == pytest.approx(1.0) and factor(20) == pytest.approx(0.0, abs=1e-12)
    assert factor(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_nesterov_option_and_step_schedule_reach_the_optimizer(tmp_path, teacher_ckpt):
    out = str(tmp_path / "run")
    run(parse_config(TINY + ["--teacher-ckpt", teacher_ckpt, "--batch-size", "500",
                             "--epochs", "3", "--no-nesterov", "--warmup-epochs", "0",
                             "--schedule", "step", "--milestones", "1", "2", "--lr", "0.4",
                             "--lr-gamma", "0.5", "--out", out]))
    state = checkpoint.load(os.path.join(out, "student", "final.pt"))
    assert state["optimizer"]["param_groups"][0]["nesterov"] is False
    # The lr logged after each epoch is the one of the next step: 0.4 * 0.5 ** milestones passed.
    lrs = [float(row["lr"]) for row in read_csv(os.path.join(out, "student", "metrics.csv"))]
    assert lrs == pytest.approx([0.2, 0.1, 0.1])
    default = parse_config(["--train-teacher"])
    assert default.nesterov is True and default.schedule == "cosine"


def test_global_batch_size_is_split_over_the_processes(monkeypatch):
    assert parse_config(["--train-teacher", "--global-batch-size", "256"]).batch_size == 256
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_config(["--train-teacher", "--global-batch-size", "256"])
    assert (cfg.batch_size, cfg.global_batch_size) == (64, 256)
    assert parse_config(["--train-teacher", "--global-batch-size", "256",
                         "--batch-size", "64"]).batch_size == 64
    with pytest.raises(ConfigError, match=_message("--global-batch-size 250 is not divisible by "
                                                   "the 4 processes")):
        parse_config(["--train-teacher", "--global-batch-size", "250"])
    with pytest.raises(ConfigError, match=_message("--batch-size 32 x 4 process(es) is not "
                                                   "--global-batch-size 256")):
        parse_config(["--train-teacher", "--global-batch-size", "256", "--batch-size", "32"])


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

RECIPES = recipe_names()


def test_every_recipe_comes_as_kd_and_kd_kendall():
    assert len(RECIPES) == 6
    for name in RECIPES:
        if not name.endswith("_kendall"):
            assert f"{name}_kendall" in RECIPES, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps_on_shapes1000(name, tmp_path, teacher_ckpt):
    """Each recipe with its data and networks swapped for shapes1000-sized ones; its solver kept."""
    out = str(tmp_path / name)
    recipe = parse_config(["--recipe", name, "--data-dir", str(tmp_path)])
    assert (recipe.schedule, recipe.warmup_epochs, recipe.nesterov) == ("step", 0.0, False)
    summaries = run(parse_config(
        ["--recipe", name, "--data", "shapes1000", "--data-dir", "none", *TINY,
         "--arch", "cifar_resnet8", "--teacher-arch", "cifar_resnet8", "--teacher-weights", "none",
         "--no-train-teacher", "--teacher-ckpt", teacher_ckpt, "--max-steps", "2",
         "--out", out]))
    assert summaries[-1]["steps"] == 2
    state = checkpoint.load(os.path.join(out, "student", "last.pt"))
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(recipe.lr)  # no warm-up, before the first milestone
    assert group["nesterov"] is False and group["weight_decay"] == recipe.weight_decay
    rows = read_csv(os.path.join(out, "student", "metrics.csv"))
    assert (rows[-1]["train_rank"] != "") == name.endswith("_kendall")
    assert rows[-1]["train_kd"] != "" and rows[-1]["train_ce"] != ""


def test_unknown_recipe_and_unknown_recipe_key_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="--recipe 'imagenet' does not exist; known recipes"):
        parse_config(["--recipe", "imagenet"])
    path = tmp_path / "mine.yaml"
    path.write_text("train_teacher: true\nmilestone: [30, 60]\n")
    with pytest.raises(ConfigError, match="unknown option 'milestone'"):
        parse_config(["--config", str(path)])
    path.write_text("train_teacher: true\nschedule: step\nmilestones: 30\n")
    with pytest.raises(ConfigError, match="'milestones' must be a list of integers"):
        parse_config(["--config", str(path)])


# ---------------------------------------------------------------------------------------------
# Pretrained teachers through torchvision's weights API and torch's hub cache
# ---------------------------------------------------------------------------------------------


def _place_weights(torch_home, arch: str, state) -> str:
    from train.teacher import pretrained_cache_path

    path = pretrained_cache_path(arch, "IMAGENET1K_V1")
    assert path.startswith(str(torch_home))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


def _pretrained_argv(out: str):
    return TINY + ["--teacher-arch", "resnet18", "--teacher-weights", "IMAGENET1K_V1",
                   "--epochs", "1", "--max-steps", "1", "--batch-size", "500", "--out", out]


def test_pretrained_teacher_loads_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(0)
    weights = build_model("resnet18", 1000).state_dict()
    _place_weights(tmp_path / "torch_home", "resnet18", weights)
    out = str(tmp_path / "run")
    summaries = run(parse_config(_pretrained_argv(out)))
    printed = capsys.readouterr().out
    assert "[teacher] resnet18 from IMAGENET1K_V1: validation top-1" in printed
    given = summaries[0]
    assert given["phase"] == "teacher (given)" and 0 <= given["val_top1"] <= 100
    assert "teacher (given)" in open(os.path.join(out, "summary.md")).read()
    assert summaries[-1]["steps"] == 1


def test_mismatched_or_missing_pretrained_weights_fail_before_training(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # No file and no network: the download fails (simulated, so that no test ever downloads).
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--teacher-weights IMAGENET1K_V1: cannot load resnet18"):
        run(parse_config(_pretrained_argv(str(out))))
    # A file of other shapes (a 10-class classifier) at the cache path.
    _place_weights(home, "resnet18", build_model("resnet18", 10).state_dict())
    with pytest.raises(ConfigError, match=r"--teacher-weights IMAGENET1K_V1: .* does not fit"):
        run(parse_config(_pretrained_argv(str(out))))
    assert not (out / "student").exists()


# ---------------------------------------------------------------------------------------------
# Clear errors before training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "step", "--milestones", "30", "20"],
     "--milestones must be strictly increasing epochs >= 1, got [30, 20]"),
    (["--schedule", "step", "--milestones", "5", "5"], "--milestones must be strictly increasing"),
    (["--schedule", "step", "--milestones", "0", "5"], "--milestones must be strictly increasing"),
    (["--schedule", "step"], "--schedule step needs --milestones"),
    (["--schedule", "step", "--milestones", "10"], "epoch 10 is not before the end of the --epochs"),
    (["--schedule", "step", "--milestones", "5", "--epochs", "20", "--teacher-epochs", "4"],
     "with --train-teacher the teacher uses them too, and epoch 5 is not before the end of its"),
    (["--milestones", "3"], "--milestones [3] applies only to --schedule step"),
    (["--schedule", "linear"], "--schedule must be one of"),
    (["--schedule", "step", "--milestones", "3", "--lr-gamma", "0"], "--lr-gamma must lie in"),
    (["--global-batch-size", "0"], "--global-batch-size must be at least 1"),
    (["--teacher-arch", "cifar_resnet8", "--teacher-weights", "IMAGENET1K_V1"],
     "torchvision has no pretrained weights for --teacher-arch cifar_resnet8"),
    (["--teacher-arch", "mobilenet_v1", "--teacher-weights", "IMAGENET1K_V1"],
     "torchvision has no pretrained weights for --teacher-arch mobilenet_v1"),
    (["--teacher-arch", "resnet18", "--teacher-weights", "IMAGENET1K_V9"],
     "--teacher-weights 'IMAGENET1K_V9': torchvision's weights for resnet18 are"),
    (["--teacher-weights", "IMAGENET1K_V1"], "--teacher-weights IMAGENET1K_V1 needs --teacher-arch"),
])
def test_bad_option_is_rejected_naming_it(argv, message):
    with pytest.raises(ConfigError, match=_message(message)):
        parse_config(["--train-teacher"] * ("--teacher-weights" not in argv) + argv)


def test_teacher_weights_with_another_teacher_source_is_rejected(teacher_ckpt):
    with pytest.raises(ConfigError, match="not both --teacher-ckpt and --teacher-weights"):
        parse_config(["--teacher-arch", "resnet18", "--teacher-weights", "IMAGENET1K_V1",
                      "--teacher-ckpt", teacher_ckpt])


def test_pretrained_teacher_with_other_classes_is_rejected(tmp_path, monkeypatch):
    from train.teacher import load_pretrained_teacher

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # (checked before any file is looked for)
    with pytest.raises(ConfigError, match="has 1000 classes, the data 100"):
        load_pretrained_teacher("resnet18", "IMAGENET1K_V1", 100, torch.device("cpu"))


def test_errors_exit_with_status_2_and_one_line(capsys):
    assert main(["--recipe", "no_such_recipe"]) == 2
    assert "error: --recipe 'no_such_recipe' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# MobileNet V1, the study statistics
# ---------------------------------------------------------------------------------------------


def test_mobilenet_v1_shape_and_size():
    model = build_model("mobilenet_v1", 1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # the paper's 4.2 M
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_t_quantiles_and_the_paired_interval():
    expected = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}
    for dof, value in expected.items():
        assert t_quantile(dof) == pytest.approx(value, abs=5e-4), dof
    diff = paired_difference([1.0, 2.0, 4.0], [0.0, 0.0, 1.0])  # differences 1, 2, 3
    assert (diff["mean"], diff["std"], diff["n"]) == (2.0, 1.0, 3)
    half = t_quantile(2) / math.sqrt(3)
    assert (diff["low"], diff["high"]) == pytest.approx((2 - half, 2 + half))
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])
