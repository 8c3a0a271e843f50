"""optim.py: every registered optimizer builds, checks its `optim.args`, round-trips its state
through the trainer's files bit-exactly; schedules against transformers; Adafactor (kohya's
recipe) step by step against transformers' Adafactor."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import optim
from eridiffusion.adafactor import Adafactor
from eridiffusion.config import ConfigError, OptimConfig, TrainConfig

# name → optim section; each library runs on the CPU in the versions of the [optim] extra
CASES = {
    "adamw": {},
    "adamw8bit": {"optimizer": "adamw8bit", "args": {"backend": "torchao"}},
    "adamw8bit-bnb": {"optimizer": "adamw8bit"},  # bitsandbytes, the default backend
    "adamw4bit": {"optimizer": "adamw4bit"},
    "prodigy": {"optimizer": "prodigy", "unet_lr": 1.0, "text_encoder_lr": 1.0, "args": {"d_coef": 2.0, "use_bias_correction": True,
                                                                 "safeguard_warmup": True}},
    "adafactor": {"optimizer": "adafactor"},
    "adafactor-kohya": {"optimizer": "adafactor", "args": {"scale_parameter": False, "relative_step": False,
                                                           "warmup_init": False}},
    "lion": {"optimizer": "lion", "unet_lr": 3e-5},
    "schedulefree_adamw": {"optimizer": "schedulefree_adamw", "warmup_steps": 2},
    "came": {"optimizer": "came"},
}  # fmt: skip


def _cfg(**o) -> OptimConfig:
    return TrainConfig.from_dict({"optim": o}).optim


def _params(seed=0):
    """Two quantizable (64×512: 8-bit states; bitsandbytes shares their qmap) and a small (8,)
    parameter, as two groups."""
    g = torch.Generator().manual_seed(seed)
    big = [torch.nn.Parameter(torch.randn(64, 512, generator=g) * 0.1) for _ in range(2)]
    small = torch.nn.Parameter(torch.randn(8, generator=g))
    return [*big, small], [{"params": big, "lr": None, "name": "unet"}, {"params": [small], "lr": None, "name": "te1"}]


def _build(o: dict, seed=0):
    cfg = _cfg(**o)
    params, groups = _params(seed)
    groups[0]["lr"], groups[1]["lr"] = cfg.unet_lr, cfg.text_encoder_lr
    return params, optim.build(cfg, groups, torch.device("cpu"))


def _steps(params, opt, start, n, total=8):
    for step in range(start, start + n):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.set_lr(step, total)
        opt.optimizer.step()


def _through_files(tmp_path, sd):
    """What train/state.py does: tensors to safetensors, the rest to JSON."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    save_file(tensors, tmp_path / "s.safetensors")
    meta = json.loads(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))
    state: dict = {}
    for k, v in load_file(tmp_path / "s.safetensors").items():
        _, idx, name = k.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


SLOW = {"adamw8bit", "adamw4bit"}  # torchao compiles its step per parameter shape: ~1 min on a CPU


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_state_round_trips_bit_exactly(name, tmp_path):
    """3 steps, save (after an eval-mode switch, as the trainer does), load into a fresh optimizer, 3 more steps:
    the same weights as 6 uninterrupted steps, and the same state (8-bit codes included)."""
    o = CASES[name]
    ref_params, ref = _build(o)
    _steps(ref_params, ref, 0, 3)
    with ref.eval_mode():  # the trainer writes the weights file here (schedule-free: x), then the state
        pass
    saved = _through_files(tmp_path, optim.state_dict(ref.optimizer))  # written now: steps change it in place
    weights = [p.detach().clone() for p in ref_params]
    _steps(ref_params, ref, 3, 3)

    params, fresh = _build(o, seed=1)
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    optim.load_state(fresh, saved)
    _steps(params, fresh, 3, 3)
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r), name
    a, b = optim.state_dict(fresh.optimizer), optim.state_dict(ref.optimizer)
    assert a["param_groups"] == b["param_groups"]
    for idx in b["state"]:
        for k, v in b["state"][idx].items():
            w = a["state"][idx][k]
            assert torch.equal(w, v) if torch.is_tensor(v) else w == v, (name, k)


@pytest.mark.slow
def test_low_bit_states_stay_quantized_after_loading(tmp_path):
    params, opt = _build(CASES["adamw8bit"])
    _steps(params, opt, 0, 1)
    sd = optim.state_dict(opt.optimizer)
    assert sd["state"][0]["exp_avg@codes"].dtype == torch.uint8 and sd["state"][0]["exp_avg@"]["type"] == "OptimState8bit"
    params, fresh = _build(CASES["adamw8bit"])
    optim.load_state(fresh, _through_files(tmp_path, sd))
    assert type(fresh.optimizer.state[params[0]]["exp_avg"]).__name__ == "OptimState8bit"
    params, opt = _build(CASES["adamw8bit-bnb"])
    _steps(params, opt, 0, 1)
    assert optim.state_dict(opt.optimizer)["state"][0]["__bnb_optimizer_quant_state__/state1"].dtype == torch.uint8


def test_prodigy_keeps_its_d_and_this_runs_lr(tmp_path):
    params, opt = _build(CASES["prodigy"])
    for _ in range(10):  # the gradient of ½|p|²: d grows
        for p in params:
            p.grad = p.detach().clone()
        opt.optimizer.step()
    sd = optim.state_dict(opt.optimizer)
    d = sd["param_groups"][0]["d"]
    assert d > 1e-6  # moved from d0
    params, fresh = _build({**CASES["prodigy"], "unet_lr": 0.5, "text_encoder_lr": 0.5})
    optim.load_state(fresh, _through_files(tmp_path, sd))
    g = fresh.optimizer.param_groups[0]
    assert g["d"] == d and g["base_lr"] == 0.5 and g["betas"] == (0.9, 0.999)


def test_wrong_argument_names_the_accepted_ones():
    _, groups = _params()
    for g in groups:
        g["lr"] = 1.0
    with pytest.raises(ConfigError) as e:
        optim.build(_cfg(optimizer="prodigy", args={"dcoef": 2}), groups, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("optim.args.dcoef is not an argument of prodigy; it takes:")
    assert "d_coef" in msg and "safeguard_warmup" in msg
    with pytest.raises(ConfigError, match=r"optim.args.block_size is not an argument of adamw8bit; .*min_8bit_size"):
        optim.build(_cfg(optimizer="adamw8bit", args={"backend": "bitsandbytes", "block_size": 128}), groups,
                    torch.device("cpu"))  # fmt: skip
    with pytest.raises(ConfigError, match="optim.args.backend = 'bitsandbytes' is not a backend of adamw4bit"):
        optim.build(_cfg(optimizer="adamw4bit", args={"backend": "bitsandbytes"}), groups, torch.device("cpu"))


def test_missing_library_names_the_extra(monkeypatch):
    real = importlib.import_module

    def no_prodigy(name, *a):
        if name.startswith("prodigyopt"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_prodigy)
    _, groups = _params()
    with pytest.raises(ConfigError) as e:
        optim.build(_cfg(optimizer="prodigy"), groups, torch.device("cpu"))
    assert str(e.value) == ("optim.optimizer = 'prodigy' needs the prodigyopt package: "
                            "pip install 'eridiffusion[optim]'")  # fmt: skip


def test_schedule_free_refuses_a_schedule_and_takes_the_warmup():
    _, groups = _params()
    for g in groups:
        g["lr"] = 1e-3
    with pytest.raises(ConfigError, match="optim.schedule = 'cosine' cannot be used with schedulefree_adamw"):
        optim.build(_cfg(optimizer="schedulefree_adamw", schedule="cosine"), groups, torch.device("cpu"))
    opt = optim.build(_cfg(optimizer="schedulefree_adamw", warmup_ratio=0.1), groups, torch.device("cpu"))
    opt.set_lr(0, 200)
    assert [(g["lr"], g["warmup_steps"]) for g in opt.optimizer.param_groups] == [(1e-3, 20)] * 2
    assert "prodigy" in optim.OPTIMIZERS and "multiplier" in optim.OPTIMIZERS["prodigy"].notes


def test_schedules_match_transformers():
    """After warmup, the factor of 0-based step s is transformers' lr_lambda(s) (warmup 0 here:
    our warmup ramps (s+1)/(w+1), theirs s/w)."""
    from transformers import optimization as T

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    restarts = T.get_cosine_with_hard_restarts_schedule_with_warmup(opt, 0, 40, num_cycles=3)
    poly = T.get_polynomial_decay_schedule_with_warmup(opt, 0, 40, lr_end=0.5, power=2.0)
    for s in range(41):
        assert optim.lr_factor(s, 40, 0, "cosine_with_restarts", num_cycles=3) == pytest.approx(restarts.lr_lambdas[0](s))
        assert optim.lr_factor(s, 40, 0, "polynomial", power=2.0, lr_end=0.25) == pytest.approx(poly.lr_lambdas[0](s))
    assert optim.lr_factor(3, 40, 4, "polynomial") == 0.8  # warmup (3+1)/(4+1)
    cfg = _cfg(warmup_ratio=0.25, schedule="linear")
    _, groups = _params()
    for g in groups:
        g["lr"] = 1.0
    opt = optim.build(cfg, groups, torch.device("cpu"))
    assert opt.warmup(40) == 10
    with pytest.raises(ConfigError, match="optim.warmup_ratio = 0.1 is invalid: must be 0 when optim.warmup_steps"):
        _cfg(warmup_ratio=0.1, warmup_steps=5)


@pytest.mark.parametrize("kw", [dict(scale_parameter=False, relative_step=False, warmup_init=False, lr=1e-3),
                                dict(scale_parameter=True, relative_step=True, warmup_init=True, lr=None),
                                dict(relative_step=False, lr=1e-2, beta1=0.9, weight_decay=0.1)])  # fmt: skip
def test_adafactor_matches_transformers(kw):
    from transformers.optimization import Adafactor as Reference

    torch.manual_seed(0)
    shapes = [(16, 32), (8, 4, 3, 3), (32,)]  # Linear, Conv (factored over the last two dims), bias
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = Adafactor(ours, **kw), Reference(ref, **kw)
    for step in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_adafactor_picks_the_transformers_rule_from_its_arguments():
    _, groups = _params()
    for g in groups:
        g["lr"] = 1e-3
    cpu = torch.device("cpu")
    assert type(optim.build(_cfg(optimizer="adafactor"), groups, cpu).optimizer) is torch.optim.Adafactor
    kohya = optim.build(_cfg(**CASES["adafactor-kohya"]), groups, cpu)
    assert type(kohya.optimizer) is Adafactor and kohya.optimizer.param_groups[0]["relative_step"] is False


def test_eval_mode_gives_the_training_weights_back_bit_for_bit():
    """schedule-free's `.train()` recomputes y from x with rounding: a save (or preview) in eval mode
    must not change the run it interrupts (tests/test_optim_training.py resumes through the trainer)."""
    params, opt = _build(CASES["schedulefree_adamw"])
    _steps(params, opt, 0, 3)
    before = [p.detach().clone() for p in params]
    with opt.eval_mode():
        assert not all(torch.equal(p, b) for p, b in zip(params, before))  # the evaluation weights x
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.optimizer.param_groups[0]["train_mode"]
