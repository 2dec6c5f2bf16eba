"""Our cyclical and one-cycle schedules against torch.optim.lr_scheduler's CyclicLR and OneCycleLR, update by
update, on the same numbers: two independent implementations of Smith's formulas must agree.

The index convention is the same in both: torch's LR at `last_epoch == u` (the scheduler stepped u times after
construction) is the LR of the (u+1)-th optimizer step, which is our schedule(u). Where the two differ by a
documented convention (one_cycle's ends and its rise), the test maps ours onto torch's settings and says why.
"""

import math

import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from embedtrain.schedules import ONE_CYCLE_DEFAULTS, build_schedule


def torch_lrs(make_scheduler, n, lr=1.0):
    """The LR of each of the first n optimizer steps under a torch scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()        # before sched.step(), as torch asks
        sched.step()
    return lrs


def agree(ours, theirs, rel=1e-9, abs_=1e-15):
    assert len(ours) == len(theirs)
    for u, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=rel, abs=abs_), f"update {u + 1} (u={u}): ours {a!r}, torch {b!r}"


# ------------------------------------------------------------------ CyclicLR

@pytest.mark.parametrize("base, top, step, total", [
    (0.0, 1.13e-6, 40, 800),      # the users' run (docs/guide.md#cyclical-lr): 10 cycles
    (1e-4, 1e-2, 5, 37),          # ends in the middle of a half cycle
    (1e-3, 5e-3, 3.5, 30),        # a fractional step size (lr_cycles makes those)
    (0.0, 1.0, 1, 9),             # the shortest half cycle
])
@pytest.mark.parametrize("mode", ["triangular", "triangular2"])
def test_triangular_matches_torch_cycliclr(base, top, step, total, mode):
    ours = build_schedule(mode, top, total, min_lr=base, step_size=step if step == int(step) else 0,
                          cycles=1.0 if step == int(step) else total / (2 * step))
    assert f"step size {step:g} updates" in ours.description
    theirs = torch_lrs(lambda opt: CyclicLR(opt, base_lr=base, max_lr=top, step_size_up=step, mode=mode,
                                            cycle_momentum=False), total)
    agree(ours.unroll(), theirs)


@pytest.mark.parametrize("gamma, step, total", [(0.99, 4, 50), (0.9995, 40, 800), (1.0, 5, 20)])
def test_exp_range_matches_torch_cycliclr(gamma, step, total):
    # Both scale the amplitude by gamma ** u, u the update index (torch: scale_mode "iterations").
    ours = build_schedule("exp_range", 1e-2, total, min_lr=1e-4, step_size=step, gamma=gamma)
    theirs = torch_lrs(lambda opt: CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=step, mode="exp_range",
                                            gamma=gamma, cycle_momentum=False), total)
    agree(ours.unroll(), theirs)


# ------------------------------------------------------------------ OneCycleLR

def torch_one_cycle(lr, total, rise, div_factor, final_div_factor, strategy):
    """torch's OneCycleLR set up to make our one_cycle's phases.

    Two documented convention differences, mapped here rather than changed in ours:
    - our decays reach their end value at u == total, the LR *after* the last update (schedules.py's
      conventions, as diffusers); torch reaches min_lr at the last step, total_steps - 1. So torch gets
      total_steps = total + 1, and the comparison covers u = 0 .. total;
    - our rise takes `rise` = round_half_up(pct_start x total) updates and is at max_lr at u == rise; torch's
      first phase ends (at max_lr) at step pct_start x total_steps - 1, a float. pct_start is chosen so that
      it ends at step rise too.
    torch anneals both phases with one strategy; ours rises linearly and anneals with a cosine. The caller
    compares the rise against strategy "linear" and the anneal against "cos"."""
    steps = total + 1
    return torch_lrs(lambda opt: OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=(rise + 1) / steps,
                                            div_factor=div_factor, final_div_factor=final_div_factor,
                                            anneal_strategy=strategy, cycle_momentum=False), steps)


@pytest.mark.parametrize("lr, total, pct_start, div_factor, final_div_factor", [
    (1.0, 11, 0.3, 4.0, 10.0),                              # test_schedules' hand-worked case
    (5e-3, 200, ONE_CYCLE_DEFAULTS["lr_pct_start"], ONE_CYCLE_DEFAULTS["lr_div_factor"],
     ONE_CYCLE_DEFAULTS["lr_final_div_factor"]),           # the defaults, which are torch's
    (2e-2, 57, 0.45, 10.0, 100.0),
])
def test_one_cycle_matches_torch_onecyclelr(lr, total, pct_start, div_factor, final_div_factor):
    ours = build_schedule("one_cycle", lr, total, pct_start=pct_start, div_factor=div_factor,
                          final_div_factor=final_div_factor)
    rise = math.floor(pct_start * total + 0.5)
    assert f"over {rise} updates" in ours.description
    lrs = ours.unroll(total + 1)   # u = total: the value after the last update, torch's last step
    linear = torch_one_cycle(lr, total, rise, div_factor, final_div_factor, "linear")
    cos = torch_one_cycle(lr, total, rise, div_factor, final_div_factor, "cos")
    agree(lrs[:rise + 1], linear[:rise + 1])       # start_lr -> lr, linearly
    agree(lrs[rise:], cos[rise:])                  # lr -> final_lr, a cosine
    assert lrs[0] == pytest.approx(lr / div_factor) and lrs[-1] == pytest.approx(lr / div_factor / final_div_factor)


def test_one_cycle_defaults_are_torchs():
    import inspect
    defaults = inspect.signature(OneCycleLR).parameters
    assert ONE_CYCLE_DEFAULTS == {"lr_pct_start": defaults["pct_start"].default,
                                  "lr_div_factor": defaults["div_factor"].default,
                                  "lr_final_div_factor": defaults["final_div_factor"].default}
