"""torchdistill (pinned in requirements-dev.txt) runs the Kendall term, and checks the harness's KD.

- The adapter (rkkd_kernels/integrations/torchdistill.py): registered under ``KendallLoss``, equal
  to ``kendall_loss`` on the logits it finds, its errors; ``import rkkd_kernels`` without it.
- Each config of configs/torchdistill/ builds a ``DistillationBox`` through torchdistill's
  ``get_distillation_box`` and trains 3 steps on the CPU: small stand-in models (torchdistill's
  WRN-10-2 teacher and WRN-10-1 student, with the config's class count) and a small in-memory
  dataset instead of the real ones (whose ``!import_call`` would read ImageNet folders or download
  CIFAR-100), the data loaders' batch size, workers and pinning made small for that, everything
  else of the ``train`` section as in the config.
- torchdistill's ``KDLoss`` as an independent implementation of the harness's KD (train/loop.py).
  The mapping: ``KDLoss`` returns the bare batch-mean KL when ``alpha`` is None or 0 or no targets
  are given, and ``alpha * CE + beta * T^2 * KL`` otherwise, so

      harness kd term                           = T^2 * KDLoss(alpha=0)
      ce_weight * CE + kd_weight * (kd term)    = KDLoss(alpha=ce_weight, beta=kd_weight)

  Both sides are float32 evaluations of one formula along different paths (torchdistill's KL takes
  the teacher's softmax, the harness's its log_softmax), each within about one ulp of the float64
  value in these cases, so they must agree to ``RTOL`` = 1e-6 (about 8 float32 ulps, room for the
  summation order); a dropped T^2 (x4 or x16), a dropped weight or a mean over classes instead of
  rows is orders of magnitude outside it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if torch.__version__ < "2.12":
    pytest.skip(f"torchdistill 1.1.5 needs torch >= 2.12; this is torch {torch.__version__}",
                allow_module_level=True)

import yaml  # noqa: E402
from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.losses.mid_level import KDLoss  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_mid_level_loss  # noqa: E402
from torchdistill.models.registry import MODEL_DICT, get_model  # noqa: E402
from torchvision import models as tv_models  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402
from rkkd_kernels import kendall_loss  # noqa: E402
from rkkd_kernels.integrations import torchdistill as integration  # noqa: E402
from train.config import Config, recipe_path  # noqa: E402
from train.loop import Phase, loss_terms  # noqa: E402

CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "torchdistill")
CONFIGS = ["ilsvrc2012/kd_kendall-resnet18_from_resnet34.yaml",
           "cifar100/kd_kendall-wide_resnet40_1_from_wide_resnet40_4.yaml"]
RTOL = 1e-6


def _io(logits: torch.Tensor, path: str = ".", io: str = "output") -> dict:
    """An io dict as torchdistill's DistillationBox hands it to a mid-level loss."""
    return {path: {io: logits}}


def _logits(rows: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(rows, classes, generator=g)
    teacher = 3 * torch.randn(rows, classes, generator=g)
    labels = torch.randint(0, classes, (rows,), generator=g)
    return student, teacher, labels


def _adapter(**options) -> torch.nn.Module:
    kwargs = dict(student_module_path=".", student_module_io="output",
                  teacher_module_path=".", teacher_module_io="output")
    kwargs.update(options)
    return get_mid_level_loss({"key": "KendallLoss", "kwargs": kwargs})


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


def test_import_rkkd_kernels_needs_no_torchdistill_and_the_adapter_says_how_to_get_it():
    script = (
        "import sys\n"
        "import rkkd_kernels, rkkd_kernels.integrations\n"
        "assert 'torchdistill' not in sys.modules, 'import rkkd_kernels imported torchdistill'\n"
        "sys.modules['torchdistill'] = None  # as if it were not installed\n"
        "try:\n"
        "    import rkkd_kernels.integrations.torchdistill\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install 'rkkd-kernels[torchdistill]'" in out.stdout


def test_registered_under_the_key_and_equal_to_kendall_loss():
    assert MIDDLE_LEVEL_LOSS_DICT["KendallLoss"] is integration.TorchdistillKendallLoss
    student, teacher, labels = _logits(16, 50, seed=1)
    for options in ({}, {"k": 2.5}, {"hard_teacher": True, "method": "pairs"},
                    {"hard_teacher": True, "method": "expsum"}, {"top_k": 7},
                    {"reduction": "sum"}):
        got = _adapter(**options)(_io(student), _io(teacher), labels)
        want = kendall_loss(student, teacher, options.pop("k", 1.0), **options)
        assert torch.equal(got, want), options


def test_classes_on_dimension_1_and_the_teacher_detached():
    # (N, C, H, W) as for dense outputs: each position is a row of C classes, as in KDLoss.
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 6, 3, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 6, 3, 4, generator=g, requires_grad=True)
    got = _adapter(k=1.5)(_io(student), _io(teacher))
    want = kendall_loss(student.movedim(1, -1), teacher.detach().movedim(1, -1), 1.5)
    assert torch.equal(got, want)
    got.backward()
    assert student.grad is not None and teacher.grad is None


def test_logits_from_a_hooked_module_path():
    student, teacher, _ = _logits(8, 10, seed=3)
    loss = _adapter(student_module_path="fc", student_module_io="input",
                    teacher_module_path="head", teacher_module_io="output")
    got = loss({".": {"output": None}, "fc": {"input": student}}, _io(teacher, "head"))
    assert torch.equal(got, kendall_loss(student, teacher))


def test_bad_input_is_named():
    student, teacher, _ = _logits(4, 10, seed=4)
    loss = _adapter(student_module_path="fc", student_module_io="output")
    with pytest.raises(ValueError, match=r"student_module_path 'fc' is not in the student io dict "
                                         r"\(its paths: \['\.'\]\)"):
        loss(_io(student), _io(teacher))
    with pytest.raises(ValueError, match=r"student_module_io 'output' was not recorded for "
                                         r"student_module_path 'fc' \(recorded: \['input'\]\)"):
        loss(_io(student, "fc", "input"), _io(teacher))
    with pytest.raises(ValueError, match=r"teacher_module_path 'head' is not in the teacher io dict"):
        _adapter(teacher_module_path="head")(_io(student), _io(teacher))
    with pytest.raises(ValueError, match=r"the student's output at '\.' has shape \(4, 10\) but the "
                                         r"teacher's output at '\.' has shape \(4, 9\)"):
        _adapter()(_io(student), _io(teacher[:, :9]))
    with pytest.raises(TypeError, match=r"the student's output at '\.' is a tuple, not a tensor"):
        _adapter()(_io((student,)), _io(teacher))
    with pytest.raises(ValueError, match=r"has shape \(4,\); logits need the shape \(N, C\)"):
        _adapter()(_io(student[:, 0]), _io(teacher[:, 0]))
    # Options fail when torchdistill builds the criterion, with rkkd_kernels' messages.
    with pytest.raises(ValueError, match="k must be a positive finite number"):
        _adapter(k=-1.0)
    with pytest.raises(ValueError, match="top_k must be at least 2"):
        _adapter(top_k=1)
    with pytest.raises(ValueError, match="method=.expsum. needs hard_teacher=True"):
        _adapter(method="expsum")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        _adapter(reduction="none")
    with pytest.raises(TypeError, match="student_module_path must be a string"):
        _adapter(student_module_path=None)
    with pytest.raises(TypeError, match="temperature"):
        _adapter(temperature=4.0)  # a KDLoss option, not one of this loss


def test_the_wheel_ships_the_integration_and_the_extra_names_torchdistill():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    assert "rkkd_kernels.integrations" in project["tool"]["setuptools"]["packages"]
    extra = project["project"]["optional-dependencies"]["torchdistill"]
    assert any(req.replace(" ", "").startswith("torchdistill>=") for req in extra), extra


# ---------------------------------------------------------------------------------------------
# The configs, run by torchdistill's DistillationBox
# ---------------------------------------------------------------------------------------------


class _Uncalled:
    """An ``!import_call`` left uncalled (the real datasets): the test puts its own in their place."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec


def _load_config(name: str) -> dict:
    """The YAML with torchdistill's tags, except that ``!import_call`` is not called."""

    class Loader(yaml.FullLoader):  # a subclass: FullLoader itself stays as it is
        pass

    for tag, constructor in (("!join", yaml_util.yaml_join), ("!pathjoin", yaml_util.yaml_pathjoin),
                             ("!import_get", yaml_util.yaml_import_get),
                             ("!getattr", yaml_util.yaml_getattr)):
        Loader.add_constructor(tag, constructor)
    Loader.add_constructor(
        "!import_call", lambda loader, node: _Uncalled(loader.construct_mapping(node, deep=True)))
    with open(os.path.join(CONFIG_DIR, name)) as handle:
        return yaml.load(handle, Loader=Loader)


def _walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)


def test_the_config_folder_holds_the_configs_tested_here():
    found = sorted(os.path.relpath(os.path.join(d, f), CONFIG_DIR)
                   for d, _, files in os.walk(CONFIG_DIR) for f in files if f.endswith(".yaml"))
    assert found == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_names_real_models_and_imports_the_integration(name):
    config = _load_config(name)
    assert {"name": "rkkd_kernels.integrations.torchdistill"} in config["dependencies"]
    for role in ("teacher_model", "student_model"):
        key = config["models"][role]["key"]
        assert key in tv_models.__dict__ or key in MODEL_DICT, f"{role}: unknown model {key!r}"
    # Only the datasets are left uncalled; the train section is plain data.
    assert all(isinstance(v, _Uncalled) for v in config["datasets"].values())
    assert not any(isinstance(v, _Uncalled) for v in _walk(config["train"]))


def _tiny_dataset(classes: int, count: int, seed: int) -> torch.utils.data.Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 16, 16, generator=g)
    return torch.utils.data.TensorDataset(images, torch.randint(0, classes, (count,), generator=g))


@pytest.mark.parametrize("name", CONFIGS)
def test_distillation_box_trains_with_the_kendall_term(name):
    config = _load_config(name)
    train_config = config["train"]
    classes = config["models"]["student_model"]["kwargs"]["num_classes"]
    datasets = {key: _tiny_dataset(classes, 12, seed) for seed, key in enumerate(config["datasets"])}
    for loader in ("train_data_loader", "val_data_loader"):
        train_config[loader]["kwargs"].update(batch_size=4, num_workers=0, pin_memory=False)
    torch.manual_seed(0)
    teacher = get_model("wide_resnet", depth=10, k=2, dropout_p=0.0, num_classes=classes,
                        pretrained=False, progress=False)
    student = get_model("wide_resnet", depth=10, k=1, dropout_p=0.0, num_classes=classes,
                        pretrained=False, progress=False)
    box = get_distillation_box(teacher, student, datasets, train_config, torch.device("cpu"),
                               None, False, 1)

    kendall, kendall_weight = box.criterion.term_dict["kendall"]
    kd, kd_weight = box.criterion.term_dict["kd"]
    assert isinstance(kendall, integration.TorchdistillKendallLoss)
    assert isinstance(kd, KDLoss)
    options = train_config["criterion"]["kwargs"]["sub_terms"]["kendall"]["criterion"]["kwargs"]
    calls = {}
    kendall.register_forward_hook(lambda m, args, out: calls.__setitem__("kendall", (args, out)))
    kd.register_forward_hook(lambda m, args, out: calls.__setitem__("kd", out))

    before = [p.detach().clone() for p in box.student_model.parameters()]
    box.pre_epoch_process(epoch=0)
    steps = 0
    for images, labels, supp in box.train_data_loader:
        calls.clear()
        loss = box.forward_process(images, labels, supp)
        (student_io, teacher_io, _), kendall_part = calls["kendall"]
        student_logits = student_io["."]["output"]
        teacher_logits = teacher_io["."]["output"]
        assert student_logits.shape == (4, classes)
        want = kendall_loss(student_logits, teacher_logits.detach(), options["k"],
                            hard_teacher=options["hard_teacher"], top_k=options["top_k"],
                            method=options["method"])
        assert torch.equal(kendall_part, want)
        assert kendall_part.requires_grad  # the term reaches the student's gradient
        # WeightedSumLoss adds weight * term in order: the same float32 operations.
        assert torch.equal(loss, kd_weight * calls["kd"] + kendall_weight * kendall_part)
        assert torch.isfinite(loss)
        box.post_forward_process(loss=loss)
        steps += 1
    assert steps == 3
    after = list(box.student_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the optimizer never stepped"


# ---------------------------------------------------------------------------------------------
# torchdistill's KDLoss against the harness's KD
# ---------------------------------------------------------------------------------------------


def _harness_terms(ce_weight: float, kd_weight: float, temperature: float, student, teacher, labels):
    phase = Phase("student", "cifar_resnet8", 1, 0.1, ce_weight, kd_weight, 0.0, seed_offset=0)
    terms = loss_terms(phase, Config(temperature=temperature), student, teacher, labels, None)
    return terms, sum(phase.weight(name) * value for name, value in terms.items())


def _kl64(student, teacher, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over rows, in float64."""
    p_log = torch.log_softmax(teacher.double() / temperature, dim=1)
    q_log = torch.log_softmax(student.double() / temperature, dim=1)
    return temperature**2 * (p_log.exp() * (p_log - q_log)).sum(1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("classes", [100, 1000])
def test_harness_kd_term_is_t_squared_times_kdloss_bare_kl(temperature, classes):
    student, teacher, labels = _logits(64, classes, seed=classes + int(temperature))
    terms, _ = _harness_terms(0.0, 1.0, temperature, student, teacher, labels)
    ours = terms["kd"]
    assert set(terms) == {"kd"}
    # Each of KDLoss's three ways to return the bare KL.
    # (alpha=None needs a beta: KDLoss's default beta is 1 - alpha.)
    bare = [KDLoss(".", "output", ".", "output", temperature=temperature, alpha=alpha, beta=0.5)(
        _io(student), _io(teacher), targets) for alpha, targets in
        ((0, labels), (None, labels), (0.5, None))]
    for value in bare:
        torch.testing.assert_close(ours, temperature**2 * value, rtol=RTOL, atol=0)
    truth = _kl64(student, teacher, temperature).float()
    torch.testing.assert_close(ours, truth, rtol=RTOL, atol=0)


@pytest.mark.parametrize("recipe, classes", [("imagenet_r34_r18_kd", 1000),
                                             ("cifar100_res32x4_res8x4_kd", 100)])
def test_harness_ce_plus_kd_with_the_recipe_weights_equals_kdloss(recipe, classes):
    with open(recipe_path(recipe)) as handle:
        settings = yaml.safe_load(handle)
    ce_weight, kd_weight, temperature = (settings["ce_weight"], settings["kd_weight"],
                                         settings["temperature"])
    student, teacher, labels = _logits(64, classes, seed=7)
    terms, ours = _harness_terms(ce_weight, kd_weight, temperature, student, teacher, labels)
    assert set(terms) == {"ce", "kd"}
    theirs = KDLoss(".", "output", ".", "output", temperature=temperature, alpha=ce_weight,
                    beta=kd_weight)(_io(student), _io(teacher), labels)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    ce64 = torch.nn.functional.cross_entropy(student.double(), labels)
    truth = (ce_weight * ce64 + kd_weight * _kl64(student, teacher, temperature)).float()
    torch.testing.assert_close(ours, truth, rtol=RTOL, atol=0)


def test_the_imagenet_config_kd_is_the_harness_imagenet_recipe():
    # Same pair, same KD: torchdistill's alpha 0.5 (beta = 1 - alpha) at T = 1 is the recipe's
    # CE 0.5 + KD 0.5 at T = 1.
    kwargs = _load_config(CONFIGS[0])["train"]["criterion"]["kwargs"]["sub_terms"]["kd"][
        "criterion"]["kwargs"]
    with open(recipe_path("imagenet_r34_r18_kd")) as handle:
        settings = yaml.safe_load(handle)
    student, teacher, labels = _logits(32, 1000, seed=8)
    _, ours = _harness_terms(settings["ce_weight"], settings["kd_weight"], settings["temperature"],
                             student, teacher, labels)
    theirs = KDLoss(**kwargs)(_io(student), _io(teacher), labels)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
