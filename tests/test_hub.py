"""hubconf.py's entries, and the README's "CAT in your own training loop" block: that it runs with only
cat.py and attacks.py beside it, and that it is train.train_step, step for step."""
import ast
import copy
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cat
import checkpoints
import config
import data
import train
from conftest import HERE

HEADING = "## CAT in your own training loop"
STEP_MARKER = "# 1. perturb"          # the block's setup ends here, its one CAT step begins


def readme_block(heading=HEADING):
    """The first python block under `heading` in README.md."""
    with open(os.path.join(HERE, "README.md")) as fh:
        text = fh.read()
    assert heading in text, f"README.md has no section {heading!r}"
    found = re.search(r"```python\n(.*?)\n```", text[text.index(heading):], re.S)
    assert found, f"no python block under {heading!r}"
    return found.group(1) + "\n"


def hub_module():
    """hubconf.py, imported as torch.hub imports it (by file path, not as a package module)."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", os.path.join(HERE, "hubconf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_load(name, **kw):
    return torch.hub.load(HERE, name, source="local", **kw)


def weights_of(name):
    return os.path.join(HERE, hub_module().MODELS[name][0])


def method_of(name):
    """The entry's training method, read from its checkpoint: every entry's weights ship with the repository."""
    assert os.path.isfile(weights_of(name)), f"{name}: {weights_of(name)} is not committed"
    return checkpoints.load_checkpoint(weights_of(name))["config"]["method"]


def test_readme_checkpoint_block_loads_a_default_trained_cat_that_works(monkeypatch):
    """"Loading a checkpoint" as it stands, run alone from the repository root (it defines its own x and
    delta, from real test images): the model it loads was trained under today's default (not
    --paper-exact), classifies, and its mask is neither collapsed nor saturated."""
    monkeypatch.chdir(HERE)
    block = readme_block("## Loading a checkpoint")
    path = re.search(r'load_checkpoint\("([^"]+)"\)', block).group(1)
    assert os.path.isfile(os.path.join(HERE, path)), f"{path} is not committed"
    assert checkpoints.load_checkpoint(path)["config"]["paper_exact"] is False
    scope = {}
    with torch.no_grad():
        exec(compile(block, "README.md: Loading a checkpoint", "exec"), scope)
    assert scope["logits"].shape == (200, 10)
    assert (scope["logits"].argmax(1) == scope["y"]).float().mean() >= 0.95
    assert scope["mask"].shape == scope["x"].shape and 0.1 < scope["mask"].mean() < 0.99


# ----------------------------------------------------------------------------- the README block

def test_readme_block_imports_only_torch_and_the_two_copyable_files():
    imported = set()
    for node in ast.walk(ast.parse(readme_block())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"torch", "attacks", "cat"}


@pytest.mark.slow
def test_readme_block_runs_with_only_cat_and_attacks_beside_it(tmp_path):
    for name in ("cat.py", "attacks.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    (tmp_path / "block.py").write_text(readme_block())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = re.search(r"loss_f (\S+) loss_g (\S+)", proc.stdout)
    assert losses, f"the block printed no losses: {proc.stdout!r}"
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.groups())


def test_readme_block_is_train_step():
    """The block's step and train.train_step, from the same nets, data and RNG, leave the same weights, batch-norm
    statistics, gradients and losses. g's logits are pushed past the logit wall first, so that the wall counts,
    and the gradients that f's parameters hold after the step show that step 4 added none to them."""
    setup, step = readme_block().split(STEP_MARKER)
    ns = {}
    exec(setup, ns)
    with torch.no_grad():
        ns["g"][-1].bias.fill_(8.0)             # z ~ 8 > the wall's bound 5
    f, g, opt_f, opt_g = copy.deepcopy([ns["f"], ns["g"], ns["opt_f"], ns["opt_g"]])
    before = {k: v.clone() for k, v in [*f.state_dict().items(), *g.state_dict().items()]}
    cfg = config.parse_config(["--dataset", "mnist"])
    cfg.update({k: ns[k] for k in ("eps", "alpha", "steps", "beta", "beta1")})
    rng = torch.get_rng_state()
    exec(STEP_MARKER + step, ns)
    torch.set_rng_state(rng)
    nets = train.Nets(f, g, opt_f, opt_g)
    logs = train.train_step(nets, ns["x"], ns["y"], cfg)
    assert cat.logit_wall(ns["z"]) > 0.1
    torch.testing.assert_close(ns["loss_f"].detach(), logs["loss_f"])
    torch.testing.assert_close(ns["loss_g"].detach(), logs["loss_g"])
    for mine, theirs in ((ns["f"], f), (ns["g"], g)):
        torch.testing.assert_close(mine.state_dict(), theirs.state_dict())
        torch.testing.assert_close([p.grad for p in mine.parameters()], [p.grad for p in theirs.parameters()])
    for name, value in [*ns["f"].named_parameters(), *ns["g"].named_parameters()]:
        assert not torch.equal(value, before[name]), f"{name} did not move"


# ----------------------------------------------------------------------------- torch.hub

def test_hub_entries_are_the_table_and_leave_out_the_broken_models():
    hub = hub_module()
    # torch.hub.list's rule: every public callable of hubconf.py is an entry
    entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entries == sorted(hub.MODELS)
    assert all(importlib.util.find_spec(d) for d in hub.dependencies)
    shipped = {os.path.dirname(path) for path, _ in hub.MODELS.values()}
    assert not shipped & {"results/mnist_cat_cent_0.3", "results/mnist_cat_cent_0.4", "results/mnist_at_0.4"}
    assert all(hub.MODELS[n][1] in getattr(hub, n).__doc__ for n in hub.MODELS)     # what torch.hub.help shows


@pytest.mark.parametrize("name", sorted(hub_module().MODELS))
def test_hub_mask_only_for_cat(name):
    method = method_of(name)
    x = torch.rand(3, 1, 28, 28)
    if method != "cat":
        with pytest.raises(ValueError, match=f"{name} is {method.upper()}, which has no mask network"):
            hub_load(name, mask=True)
        return
    f, g = hub_load(name, mask=True)
    assert not f.training and not g.training
    with torch.no_grad():
        assert g(x).shape == x.shape
        torch.testing.assert_close(f(x), hub_load(name)(x))


def test_hub_missing_weights_say_where_they_come_from():
    hub = hub_module()
    hub.MODELS["mnist_ghost"] = ("results/no_such_run/best.pt", "a run nobody trained: python train.py ...")
    with pytest.raises(FileNotFoundError, match=r"mnist_ghost: results/no_such_run/best.pt is not in this "
                                                r"checkout; it is a run nobody trained"):
        hub._entry("mnist_ghost")()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(hub_module().MODELS))
def test_hub_models_classify_real_mnist(name, mnist_small):
    method_of(name)
    test = mnist_small[1]                        # the first 500 test images
    f = hub_load(name)
    assert not f.training
    with torch.no_grad():
        accuracy = (f(data.to_float(test.images)).argmax(1) == test.labels).float().mean().item()
    assert accuracy >= 0.95, f"{name}: {accuracy:.1%} natural accuracy"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hub_device_reaches_both_networks():
    name = next(n for n in sorted(hub_module().MODELS) if os.path.isfile(weights_of(n)) and method_of(n) == "cat")
    f, g = hub_load(name, mask=True, device="cuda")
    assert {p.device.type for p in [*f.parameters(), *g.parameters()]} == {"cuda"}
