"""Bad arguments to every public function, in one table: each row calls a function with one bad
argument and expects an exception of a given type whose message names the offending argument
(and, where there is one, its value).

Rows marked xfail(strict=True) are arguments a function does not reject today (it accepts them
silently, or fails later with an error that does not name them); the mark's reason says what
happens. Strict: once the function checks the argument, the row passes, fails the suite, and the
mark must go.

Values that live on the device (``grad_scale``, ``found_inf``, the AdamW ``steps``, a tensor
``decay`` on CUDA) are not in the table: checking them would need a host synchronisation, which
the ops avoid by design.
"""

from __future__ import annotations

import math

import pytest
import torch

import saf_kernels as sk
import saf_kernels.physical as ph
from saf_kernels import BackendUnavailable, _backend, sharpness
from saf_kernels import ops as O
from saf_kernels.optim import (ASAM, ESAM, GSAM, MSAM, RSAM, SAM, AdaptivePolicy, CosineIncrease, LookSAM, MSAMAdamW,
                               ProportionScheduler, default_adaptive_filter, first_pass, frozen_bn_stats,
                               norm_layer_filter)
from saf_kernels.optim.esam import index_batch, per_sample_closure

SGD, AdamW = torch.optim.SGD, torch.optim.AdamW
CE = torch.nn.functional.cross_entropy

# How an xfail row fails today (xfail's ``raises``).
ACCEPTED = pytest.fail.Exception  # pytest.raises: DID NOT RAISE
WRONG_MESSAGE = AssertionError  # pytest.raises: the message does not name the argument


def bad(label, call, exc, match, xfail=None, raises=None, needs_ext=False):
    """One row. ``needs_ext``: the message is the compiled CPU op's (the plain-PyTorch fallback
    raises torch's own error there)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail, raises=raises)] if xfail else []
    if needs_ext:
        marks.append(pytest.mark.skipif(not _backend.HAS_EXT, reason="saf_kernels._C is not built"))
    return pytest.param(call, exc, match, id=label, marks=marks)


# ---------------------------------------------------------------------------------------------
# Inputs, built inside the rows (nothing is allocated at collection)
# ---------------------------------------------------------------------------------------------


def z(B=4, C=5):
    return torch.randn(B, C)


def y(B=4, C=5):
    return torch.randint(0, C, (B,))


def lst(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def pgs():
    """params, grads, stash of two tensors."""
    return lst(4, 3), lst(4, 3), lst(4, 3)


def sam(**kw):
    return O.sam_perturb_(*pgs(), kw.pop("rho", 0.05), **kw)


def sgd(bufs=(), **kw):
    return O.sam_restore_sgd_(*pgs(), list(bufs), **{"lr": 0.1, **kw})


def adamw(steps=None, exp_avg=None, **kw):
    steps = [torch.ones(()), torch.ones(())] if steps is None else steps
    return O.sam_restore_adamw_(*pgs(), exp_avg or lst(4, 3), lst(4, 3), steps, **{"lr": 0.1, **kw})


def esam(rho=0.05, beta=0.5, seed=1, offset=0, **kw):
    return O.esam_perturb_(*pgs(), rho, beta, seed, offset, **kw)


def gsam(stash=None, **kw):
    p, g, s = pgs()
    return O.gsam_combine_(p, g, lst(4, 3), s if stash is None else stash, **kw)


def gsam_sgd(bufs=(), **kw):
    p, g, s = pgs()
    return O.gsam_restore_sgd_(p, g, lst(4, 3), s, list(bufs), **{"lr": 0.1, **kw})


def raw_bank(N=4, S=1, C=3, values=None, epochs=None, state=None):
    values = torch.zeros(N, S, C) if values is None else values
    epochs = torch.full((N, S), -1, dtype=torch.int32) if epochs is None else epochs
    state = torch.zeros(8, dtype=torch.int64) if state is None else state
    return values, epochs, torch.zeros(N, dtype=torch.int32), state


def bank_step(ids=None, bank=None, **kw):
    ids = torch.arange(2) if ids is None else ids
    return O.trajectory_bank_step(torch.randn(2, 3), None, ids, *(bank or raw_bank()), 0, **kw)


def model():
    return torch.nn.Linear(3, 2)


def params():
    return model().parameters()


def data():
    return [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]


def optimizer_step(make):
    """Build an optimizer on a small model and take one step (for arguments checked only then)."""
    net = model()
    opt = make(net.parameters())
    x, t = data()[0]

    def closure():
        loss = CE(net(x), t)
        loss.backward()
        return loss

    return opt.step(closure)


def mesa_call(epoch, **kw):
    return sk.MESA(model(), **kw)(torch.randn(4, 2), torch.randint(0, 2, (4,)), torch.randn(4, 3), epoch=epoch)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

LOSSES = [
    bad("trajectory_kl_loss:temperature=0", lambda: sk.trajectory_kl_loss(z(), z(), 0.0), ValueError,
        r"temperature must be > 0, got 0\.0"),
    bad("trajectory_kl_loss:temperature=nan", lambda: sk.trajectory_kl_loss(z(), z(), math.nan), ValueError,
        r"temperature must be a finite number, got nan"),
    bad("trajectory_kl_loss:temperature=True", lambda: sk.trajectory_kl_loss(z(), z(), True), ValueError,
        r"temperature must be a finite number, got True"),
    bad("trajectory_kl_loss:reduction", lambda: sk.trajectory_kl_loss(z(), z(), 5.0, "avg"), ValueError,
        r"reduction must be one of .*got 'avg'"),
    bad("trajectory_kl_loss:logits-1d", lambda: sk.trajectory_kl_loss(z()[0], z()[0]), ValueError,
        r"logits must be 2-D \[batch, classes\], got shape \(5,\)"),
    bad("trajectory_kl_loss:logits-int", lambda: sk.trajectory_kl_loss(z().long(), z()), TypeError,
        r"logits must be float32, float16, bfloat16 or float64, got torch\.int64"),
    bad("trajectory_kl_loss:target-shape", lambda: sk.trajectory_kl_loss(z(), z(4, 3)), ValueError,
        r"target_logits shape \(4, 3\) differs from logits shape \(4, 5\)"),
    bad("trajectory_kl_loss:target-list", lambda: sk.trajectory_kl_loss(z(), z().tolist()), TypeError,
        r"target_logits must be a torch\.Tensor, got list"),
    bad("trajectory_kl_loss:no-classes", lambda: sk.trajectory_kl_loss(z(4, 0), z(4, 0)), ValueError,
        r"logits need at least one class, got shape \(4, 0\)"),
    bad("trajectory_kl_loss:backend", lambda: sk.trajectory_kl_loss(z(), z(), backend="gpu"), ValueError,
        r"unknown backend 'gpu'"),
    bad("trajectory_kl_loss:backend-cuda-cpu-tensors", lambda: sk.trajectory_kl_loss(z(), z(), backend="cuda"),
        BackendUnavailable, r"backend 'cuda' .*needs cuda tensors, got cpu tensors"),
    bad("saf_loss:lam=inf", lambda: sk.saf_loss(z(), y(), z(), lam=math.inf), ValueError,
        r"lam must be a finite number, got inf"),
    bad("saf_loss:lam-str", lambda: sk.saf_loss(z(), y(), z(), lam="0.3"), ValueError,
        r"lam must be a finite number, got '0\.3'"),
    bad("saf_loss:temperature=0", lambda: sk.saf_loss(z(), y(), z(), temperature=0), ValueError,
        r"temperature must be > 0, got 0"),
    bad("saf_loss:label_smoothing=1.5", lambda: sk.saf_loss(z(), y(), z(), label_smoothing=1.5), ValueError,
        r"label_smoothing must be in \[0\.0, 1\.0\], got 1\.5"),
    bad("saf_loss:targets-float-1d", lambda: sk.saf_loss(z(), y().float(), z()), ValueError,
        r"probability targets must have the logits' shape \(4, 5\), got \(4,\)"),
    bad("saf_loss:targets-bool", lambda: sk.saf_loss(z(), y().bool(), z()), TypeError,
        r"targets must be int64 or int32 class indices or floating probabilities, got torch\.bool"),
    bad("saf_loss:targets-shape", lambda: sk.saf_loss(z(), y(3), z()), ValueError,
        r"class-index targets must have shape \(4,\), got \(3,\)"),
    bad("saf_loss:soft-label_smoothing", lambda: sk.saf_loss(z(), z().softmax(-1), z(), label_smoothing=0.1),
        ValueError, r"label_smoothing=0\.1 applies to class-index targets"),
    bad("saf_loss:soft-negative", lambda: sk.saf_loss(z(), -z().softmax(-1), z()), ValueError,
        r"probability targets must be finite and >= 0; row 0 holds -0\.\d+ at column 0"),
    bad("saf_loss:label-out-of-range", lambda: sk.saf_loss(z(), torch.tensor([0, 1, 7, 2]), z()), IndexError,
        r"label 7 of row 2 is outside \[0, 5\)", needs_ext=True),
    bad("saf_loss:ignore_index=1.5", lambda: sk.saf_loss(z(), y(), z(), ignore_index=1.5), TypeError,
        r"ignore_index must be an int, got 1\.5"),
]

BANK = [
    bad("TrajectoryBank:num_samples=0", lambda: sk.TrajectoryBank(0, 10), ValueError,
        r"num_samples must be an int >= 1, got 0"),
    bad("TrajectoryBank:num_samples=True", lambda: sk.TrajectoryBank(True, 10), ValueError,
        r"num_samples must be an int >= 1, got True"),
    bad("TrajectoryBank:num_classes=2.5", lambda: sk.TrajectoryBank(10, 2.5), ValueError,
        r"num_classes must be an int >= 1, got 2\.5"),
    bad("TrajectoryBank:delay=0", lambda: sk.TrajectoryBank(10, 10, delay=0), ValueError,
        r"delay must be an int >= 1, got 0"),
    bad("TrajectoryBank:dtype=float64", lambda: sk.TrajectoryBank(10, 10, dtype=torch.float64), TypeError,
        r"dtype must be torch\.bfloat16, torch\.float16 or torch\.float32, got torch\.float64"),
    bad("TrajectoryBank:pin_memory-cpu", lambda: sk.TrajectoryBank(10, 10, device="cpu", pin_memory=True),
        ValueError, r"pin_memory=True serves CUDA logits, not cpu"),
    bad("TrajectoryBank.step:backend", lambda: sk.TrajectoryBank(10, 5, backend="gpu").step(z(), y(),
        torch.arange(4), 0), ValueError, r"unknown backend 'gpu'"),
    bad("TrajectoryBank.step:id-out-of-range", lambda: sk.TrajectoryBank(3, 5).step(z(), y(), torch.arange(4), 0),
        IndexError, r"sample id 3 of row 3 is outside the bank's range \[0, 3\)"),
    bad("TrajectoryBank.step:duplicate-id", lambda: sk.TrajectoryBank(10, 5).step(z(), y(),
        torch.tensor([1, 2, 2, 3]), 0), ValueError, r"sample id 2 appears in rows 1 and 2 of one batch"),
    bad("TrajectoryBank.step:ids-float", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4.0), 0),
        TypeError, r"sample ids must be int64 or int32, got torch\.float32"),
    bad("TrajectoryBank.step:epoch=-1", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), -1),
        ValueError, r"epoch must be an int in \[0, 2\*\*31 - 1\) \(0-based\), got -1"),
    bad("TrajectoryBank.step:epoch=1.5", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), 1.5),
        ValueError, r"epoch must be an int .*got 1\.5"),
    bad("TrajectoryBank.step:classes", lambda: sk.TrajectoryBank(10, 6).step(z(), y(), torch.arange(4), 0),
        ValueError, r"the bank holds 6 classes but the logits have 5"),
    bad("TrajectoryBank.step:temperature=0", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), 0,
        temperature=0.0), ValueError, r"temperature must be > 0, got 0\.0"),
    bad("TrajectoryBank.step:lam=nan", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), 0,
        lam=math.nan), ValueError, r"lam must be a finite number, got nan"),
    bad("TrajectoryBank.step:label_smoothing", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), 0,
        label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0\.0, 1\.0\], got -0\.1"),
    bad("TrajectoryBank.step:label-out-of-range", lambda: sk.TrajectoryBank(10, 5).step(z(),
        torch.tensor([0, 1, 9, 2]), torch.arange(4), 0), IndexError, r"label 9 of row 2 is outside \[0, 5\)"),
    bad("TrajectoryBank.step:ignore_index=1.5", lambda: sk.TrajectoryBank(10, 5).step(z(), y(), torch.arange(4), 0,
        ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1\.5"),
    bad("TrajectoryBank.record:id-out-of-range", lambda: sk.TrajectoryBank(3, 5).record(z(), torch.arange(4), 0),
        IndexError, r"sample id 3 of row 3 is outside the bank's range \[0, 3\)"),
    bad("TrajectoryBank.load_state_dict:shape", lambda: sk.TrajectoryBank(10, 5).load_state_dict(
        sk.TrajectoryBank(11, 5).state_dict()), ValueError, r"num_samples is 11 in the checkpoint but 10 here"),
    bad("SAF:lam=nan", lambda: sk.SAF(10, 5, lam=math.nan), ValueError, r"lam must be a finite number, got nan"),
    bad("SAF:temperature=0", lambda: sk.SAF(10, 5, temperature=0.0), ValueError, r"temperature must be > 0, got 0\.0"),
    bad("SAF:start_epoch=-1", lambda: sk.SAF(10, 5, start_epoch=-1), ValueError,
        r"start_epoch must be an int >= 0, got -1"),
    bad("SAF:label_smoothing=2", lambda: sk.SAF(10, 5, label_smoothing=2.0), ValueError,
        r"label_smoothing must be in \[0\.0, 1\.0\], got 2\.0"),
    bad("SAF:delay=0", lambda: sk.SAF(10, 5, delay=0), ValueError, r"delay must be an int >= 1, got 0"),
    bad("SAF:num_samples=0", lambda: sk.SAF(0, 5), ValueError, r"num_samples must be an int >= 1, got 0"),
    bad("SAF.__call__:epoch=-1", lambda: sk.SAF(10, 5)(z(), y(), torch.arange(4), -1), ValueError,
        r"epoch must be an int .*got -1"),
    bad("SAF:ignore_index=1.5", lambda: sk.SAF(10, 5, ignore_index=1.5), TypeError,
        r"SAF: ignore_index must be an int, got 1\.5"),
    bad("MESA:model", lambda: sk.MESA("model"), TypeError, r"model must be a torch\.nn\.Module, got str"),
    bad("MESA:decay=1.5", lambda: sk.MESA(model(), decay=1.5), ValueError,
        r"decay must be in \[0\.0, 1\.0\], got 1\.5"),
    bad("MESA:decay=nan", lambda: sk.MESA(model(), decay=math.nan), ValueError,
        r"decay must be a finite number, got nan"),
    bad("MESA:lam=inf", lambda: sk.MESA(model(), lam=math.inf), ValueError, r"lam must be a finite number, got inf"),
    bad("MESA:temperature=-1", lambda: sk.MESA(model(), temperature=-1.0), ValueError,
        r"temperature must be > 0, got -1\.0"),
    bad("MESA:start_epoch=-1", lambda: sk.MESA(model(), start_epoch=-1), ValueError,
        r"start_epoch must be an int >= 0, got -1"),
    bad("MESA:label_smoothing=1.1", lambda: sk.MESA(model(), label_smoothing=1.1), ValueError,
        r"label_smoothing must be in \[0\.0, 1\.0\], got 1\.1"),
    bad("MESA:teacher_autocast", lambda: sk.MESA(model(), teacher_autocast=torch.float32), ValueError,
        r"teacher_autocast must be None, torch\.bfloat16 or torch\.float16, got torch\.float32"),
    bad("MESA:teacher", lambda: sk.MESA(model(), teacher="t"), TypeError,
        r"MESA: teacher must be a torch\.nn\.Module or None, got str"),
    bad("MESA:teacher-shape", lambda: sk.MESA(model(), teacher=torch.nn.Linear(2, 2)), ValueError,
        r"MESA: the teacher's weight has shape \[2, 2\] but the model's has \[2, 3\]"),
    bad("MESA.__call__:no-inputs", lambda: sk.MESA(model(), start_epoch=0)(torch.randn(4, 2),
        torch.randint(0, 2, (4,)), epoch=0), ValueError, r"give the model's inputs or teacher_logits"),
    bad("MESA.__call__:backend", lambda: mesa_call(0, backend="gpu"), ValueError, r"unknown backend 'gpu'"),
    bad("MESA:ignore_index=1.5", lambda: sk.MESA(model(), ignore_index=1.5), TypeError,
        r"MESA: ignore_index must be an int, got 1\.5"),
    bad("MESA.__call__:epoch=-1", lambda: mesa_call(-1), ValueError, r"MESA: epoch must be an int .*got -1"),
    bad("MESA.__call__:epoch=1.5", lambda: mesa_call(1.5), ValueError, r"MESA: epoch must be an int .*got 1\.5"),
    bad("IndexedDataset:object", lambda: sk.IndexedDataset(object()), TypeError,
        r"needs a map-style dataset \(__getitem__ and __len__\), got object"),
]

EMA = [
    bad("ema_update_:decay=1.5", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), 1.5), ValueError,
        r"decay must be in \[0, 1\], got 1\.5"),
    bad("ema_update_:decay=nan", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), math.nan), ValueError,
        r"decay must be in \[0, 1\], got nan"),
    bad("ema_update_:decay=True", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), True), ValueError,
        r"decay must be in \[0, 1\], got True"),
    bad("ema_update_:decay-tensor-2", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), torch.tensor([0.9, 0.8])),
        ValueError, r"decay must be a float or a one-element floating tensor"),
    bad("ema_update_:decay-tensor-int", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), torch.tensor(1)), ValueError,
        r"decay must be a float or a one-element floating tensor"),
    bad("ema_update_:decay-tensor-1.5-cpu", lambda: sk.ema_update_(lst(4, 3), lst(4, 3), torch.tensor(1.5)),
        ValueError, r"decay must be in \[0, 1\], got 1\.5", needs_ext=True),
    bad("ema_update_:lengths", lambda: sk.ema_update_(lst(4, 3), lst(4), 0.9), ValueError,
        r"ema has 2 tensors but model has 1"),
    bad("ema_update_:not-a-list", lambda: sk.ema_update_(torch.randn(3), torch.randn(3), 0.9), TypeError,
        r"ema and model must be lists of tensors"),
    bad("ema_update_:shape", lambda: sk.ema_update_(lst(4, 3), lst(4, 4), 0.9), ValueError,
        r"model\[1\] has shape \[4\] but ema\[1\] has shape \[3\]"),
    bad("ema_update_:int-ema", lambda: sk.ema_update_([torch.ones(3, dtype=torch.long)], lst(3), 0.9), TypeError,
        r"ema\[0\] has dtype (Long|torch\.int64)"),
    bad("ema_update_:backend", lambda: sk.ema_update_(lst(4), lst(4), 0.9, backend="fast"), ValueError,
        r"unknown backend 'fast'"),
]

SAM_OPS = [
    bad("sam_perturb_:adaptive=1", lambda: sam(adaptive=1), TypeError, r"adaptive\[0\] must be a bool, got 1"),
    bad("available:device", lambda: sk.available("gpu0"), ValueError,
        r"available: device must be a torch\.device or a device string, got 'gpu0'"),
    bad("available:op", lambda: sk.available("cpu", "nope"), ValueError,
        r"available: op must name a registered op of saf_kernels .*got 'nope'", needs_ext=True),
    bad("sam_perturb_:rho=-0.1", lambda: sam(rho=-0.1), ValueError, r"rho\[0\] must be >= 0, got -0\.1"),
    bad("sam_perturb_:rho=nan", lambda: sam(rho=math.nan), ValueError, r"rho\[0\] must be a finite number, got nan"),
    bad("sam_perturb_:rho[1]=inf", lambda: sam(rho=[0.1, math.inf]), ValueError,
        r"rho\[1\] must be a finite number, got inf"),
    bad("sam_perturb_:rho-length", lambda: sam(rho=[0.1, 0.1, 0.1]), ValueError, r"rho has 3 values for 2 tensors"),
    bad("sam_perturb_:rho-tensor", lambda: sam(rho=torch.tensor(0.1)), TypeError,
        r"rho must be a number or a sequence of numbers, not a tensor"),
    bad("sam_perturb_:eta=-1", lambda: sam(eta=-1.0), ValueError, r"eta\[0\] must be >= 0, got -1\.0"),
    bad("sam_perturb_:eps=nan", lambda: sam(eps=math.nan), ValueError, r"eps must be a finite number >= 0, got nan"),
    bad("sam_perturb_:eps=-1", lambda: sam(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1\.0"),
    bad("sam_perturb_:adaptive-str", lambda: sam(adaptive="yes"), TypeError,
        r"adaptive\[0\] must be a bool, got 'yes'"),
    bad("sam_perturb_:stash_mode", lambda: sam(stash_mode="swap"), ValueError,
        r"stash_mode must be 'copy' \(exact restore\) or 'delta' \(lossy\), got 'swap'"),
    bad("sam_perturb_:params-tensor", lambda: O.sam_perturb_(torch.randn(4), lst(4), lst(4), 0.05), TypeError,
        r"params must be a list or tuple of tensors, got Tensor"),
    bad("sam_perturb_:grads-length", lambda: O.sam_perturb_(lst(4, 3), lst(4), lst(4, 3), 0.05), ValueError,
        r"grads has 1 tensors but params has 2"),
    bad("sam_perturb_:grads-shape", lambda: O.sam_perturb_(lst(4, 3), lst(4, 4), lst(4, 3), 0.05), ValueError,
        r"grads\[1\] has shape \[4\] but params\[1\] has shape \[3\]"),
    bad("sam_perturb_:grads-dtype", lambda: O.sam_perturb_(lst(4), lst(4, dtype=torch.float64), lst(4), 0.05),
        TypeError, r"grads\[0\] has dtype (Double|torch\.float64) but params\[0\] has dtype (Float|torch\.float32)"),
    bad("sam_perturb_:grads-dtype-torch-backend", lambda: O.sam_perturb_(lst(4), lst(4, dtype=torch.float64), lst(4),
        0.05, backend="torch"), TypeError, r"grads\[0\] has dtype torch\.float64 but params\[0\] has dtype"),
    bad("sam_perturb_:params-int", lambda: O.sam_perturb_([torch.ones(4, dtype=torch.long)], lst(4), lst(4), 0.05),
        TypeError, r"params\[0\] has dtype (Long|torch\.int64)"),
    bad("sam_perturb_:params-not-dense", lambda: O.sam_perturb_([torch.randn(4, 6)[:, ::2]], lst((4, 3)),
        lst((4, 3)), 0.05), ValueError, r"params\[0\] is not dense"),
    bad("sam_perturb_:grad_scale-shape", lambda: sam(grad_scale=torch.ones(2)), ValueError,
        r"grad_scale must be a one-element floating tensor, got shape \(2,\)"),
    bad("sam_perturb_:grad_scale-float", lambda: sam(grad_scale=2.0), TypeError,
        r"grad_scale must be a tensor or None, got float"),
    bad("sam_perturb_:found_inf-int", lambda: sam(found_inf=torch.tensor(1)), ValueError,
        r"found_inf must be a one-element floating tensor, got shape \(\) torch\.int64"),
    bad("sam_perturb_:backend", lambda: sam(backend="gpu"), ValueError, r"unknown backend 'gpu'"),
    bad("sam_restore_:stash_mode", lambda: O.sam_restore_(lst(4), lst(4), "swap"), ValueError,
        r"stash_mode must be 'copy' .*got 'swap'"),
    bad("sam_restore_:stash-length", lambda: O.sam_restore_(lst(4, 3), lst(4)), ValueError,
        r"stash has 1 tensors but params has 2"),
    bad("sam_restore_sgd_:lr=-1", lambda: sgd(lr=-1.0), ValueError, r"lr\[0\] must be >= 0, got -1\.0"),
    bad("sam_restore_sgd_:lr=nan", lambda: sgd(lr=math.nan), ValueError, r"lr\[0\] must be a finite number, got nan"),
    bad("sam_restore_sgd_:momentum=-0.5", lambda: sgd(lst(4, 3), momentum=-0.5), ValueError,
        r"momentum\[0\] must be >= 0, got -0\.5"),
    bad("sam_restore_sgd_:momentum-without-buffers", lambda: sgd(momentum=0.9), ValueError,
        r"momentum != 0 needs momentum_buffers"),
    bad("sam_restore_sgd_:buffers-length", lambda: sgd(lst(4), momentum=0.9), ValueError,
        r"momentum_buffers has 1 tensors but params has 2"),
    bad("sam_restore_sgd_:dampening=nan", lambda: sgd(dampening=math.nan), ValueError,
        r"dampening\[0\] must be a finite number, got nan"),
    bad("sam_restore_sgd_:nesterov-str", lambda: sgd(nesterov="no"), TypeError,
        r"nesterov\[0\] must be a bool, got 'no'"),
    bad("sam_restore_sgd_:weight_decay=-1", lambda: sgd(weight_decay=-1.0), ValueError,
        r"weight_decay\[0\] must be >= 0, got -1\.0"),
    bad("sam_restore_sgd_:nesterov-without-momentum", lambda: sgd(nesterov=True), ValueError,
        r"nesterov\[0\]=True needs momentum > 0 and dampening 0 .*got momentum=0\.0"),
    bad("sam_restore_adamw_:beta1=1", lambda: adamw(beta1=1.0), ValueError,
        r"beta1\[0\] must be in \[0, 1\), got 1\.0"),
    bad("sam_restore_adamw_:beta2=-0.1", lambda: adamw(beta2=-0.1), ValueError, r"beta2\[0\] must be >= 0, got -0\.1"),
    bad("sam_restore_adamw_:eps=-1", lambda: adamw(eps=-1.0), ValueError, r"eps\[0\] must be >= 0, got -1\.0"),
    bad("sam_restore_adamw_:lr=-1", lambda: adamw(lr=-1.0), ValueError, r"lr\[0\] must be >= 0, got -1\.0"),
    bad("sam_restore_adamw_:steps-int", lambda: adamw(steps=[torch.ones((), dtype=torch.long)] * 2), TypeError,
        r"steps\[0\] has dtype (Long|torch\.int64)"),
    bad("sam_restore_adamw_:steps-shape", lambda: adamw(steps=[torch.ones(2)] * 2), ValueError,
        r"steps\[0\] must have one element, got shape \[2\]"),
    bad("sam_restore_adamw_:steps-length", lambda: adamw(steps=[torch.ones(())]), ValueError,
        r"steps has 1 tensors but params has 2"),
    bad("sam_restore_adamw_:exp_avg-shape", lambda: adamw(exp_avg=lst(4, 4)), ValueError,
        r"exp_avg\[1\] has shape \[4\] but params\[1\] has shape \[3\]"),
    bad("sam_restore_adamw_:weight_decay=-1", lambda: adamw(weight_decay=-1.0), ValueError,
        r"weight_decay\[0\] must be >= 0, got -1\.0"),
]

RANDOM_OPS = [
    bad("esam_perturb_:beta=0", lambda: esam(beta=0.0), ValueError, r"beta\[0\] must be in \(0, 1\], got 0\.0"),
    bad("esam_perturb_:beta=1.5", lambda: esam(beta=1.5), ValueError, r"beta\[0\] must be in \(0, 1\], got 1\.5"),
    bad("esam_perturb_:beta=nan", lambda: esam(beta=math.nan), ValueError,
        r"beta\[0\] must be a finite number, got nan"),
    bad("esam_perturb_:rho=-1", lambda: esam(rho=-1.0), ValueError, r"rho\[0\] must be >= 0, got -1\.0"),
    bad("esam_perturb_:seed=1.5", lambda: esam(seed=1.5), ValueError,
        r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got 1\.5"),
    bad("esam_perturb_:seed=2**64", lambda: esam(seed=2**64), ValueError,
        r"seed must be an integer .*got 18446744073709551616"),
    bad("esam_perturb_:seed=None", lambda: esam(seed=None), ValueError, r"seed must be an integer .*got None"),
    bad("esam_perturb_:offset=-1", lambda: esam(offset=-1), ValueError,
        r"offset must be an integer in \[0, 2\*\*62\), got -1"),
    bad("esam_perturb_:eps=-1", lambda: esam(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1\.0"),
    bad("esam_sumsq:beta=0", lambda: O.esam_sumsq(*pgs()[:2], 0.0, 1), ValueError,
        r"esam_sumsq: beta\[0\] must be in \(0, 1\], got 0\.0"),
    bad("esam_sumsq:offset=-1", lambda: O.esam_sumsq(*pgs()[:2], 0.5, 1, -1), ValueError,
        r"esam_sumsq: offset must be an integer in \[0, 2\*\*62\), got -1"),
    bad("esam_sumsq:eta=-1", lambda: O.esam_sumsq(*pgs()[:2], 0.5, 1, eta=-1.0), ValueError,
        r"esam_sumsq: eta\[0\] must be >= 0, got -1\.0"),
    bad("esam_restore_:beta=1.5", lambda: O.esam_restore_(lst(4), lst(4), 1.5, 1), ValueError,
        r"beta\[0\] must be in \(0, 1\], got 1\.5"),
    bad("esam_restore_:seed-str", lambda: O.esam_restore_(lst(4), lst(4), 0.5, "1"), ValueError,
        r"seed must be an integer .*got '1'"),
    bad("esam_restore_:stash_mode", lambda: O.esam_restore_(lst(4), lst(4), 0.5, 1, 0, "swap"), ValueError,
        r"stash_mode must be 'copy' .*got 'swap'"),
    bad("sds_count:gamma=0", lambda: O.sds_count(0.0, 10), ValueError, r"gamma must be in \(0, 1\], got 0\.0"),
    bad("sds_count:gamma=nan", lambda: O.sds_count(math.nan, 10), ValueError, r"gamma must be in \(0, 1\], got nan"),
    bad("sds_count:batch=0", lambda: O.sds_count(0.5, 0), ValueError,
        r"the batch must hold at least one sample, got 0"),
    bad("sds_count:batch=2.5", lambda: O.sds_count(0.5, 2.5), ValueError, r"sds_count: batch must be an int .*got 2\.5"),
    bad("sds_select:shapes", lambda: O.sds_select(torch.randn(4), torch.randn(5), 0.5), ValueError,
        r"expected two per-sample loss vectors of the same shape \[B\], got \(4,\) and \(5,\)"),
    bad("sds_select:2-d", lambda: O.sds_select(torch.randn(4, 2), torch.randn(4, 2), 0.5), ValueError,
        r"per-sample loss vectors .*got \(4, 2\) and \(4, 2\)"),
    bad("sds_select:gamma=1.5", lambda: O.sds_select(torch.randn(4), torch.randn(4), 1.5), ValueError,
        r"gamma must be in \(0, 1\], got 1\.5"),
    bad("rsam_noise_:std=-0.1", lambda: O.rsam_noise_(lst((4, 3)), lst((4, 3)), -0.1, 0), ValueError,
        r"std\[0\] must be >= 0, got -0\.1"),
    bad("rsam_noise_:std=nan", lambda: O.rsam_noise_(lst((4, 3)), lst((4, 3)), math.nan, 0), ValueError,
        r"std\[0\] must be a finite number, got nan"),
    bad("rsam_noise_:seed-str", lambda: O.rsam_noise_(lst((4, 3)), lst((4, 3)), 0.1, "x"), ValueError,
        r"seed must be an integer .*got 'x'"),
    bad("rsam_noise_:output-units-not-contiguous", lambda: O.rsam_noise_([torch.randn(3, 4).t()],
        [torch.empty(3, 4).t()], 0.1, 0), ValueError,
        r"params\[0\] \(shape \[?\(?4, 3.*does not keep each output unit W\[j, \.\.\.\] contiguous"),
    bad("rsam_noise_:stash-dtype", lambda: O.rsam_noise_(lst((4, 3)), lst((4, 3), dtype=torch.bfloat16), 0.1, 0),
        TypeError, r"stash\[0\] has dtype (BFloat16|torch\.bfloat16) but params\[0\] has dtype"),
    bad("rsam_perturb_:rho=-1", lambda: O.rsam_perturb_(*pgs(), -1.0), ValueError, r"rho\[0\] must be >= 0, got -1\.0"),
    bad("rsam_perturb_:lam=nan", lambda: O.rsam_perturb_(*pgs(), 0.1, lam=math.nan), ValueError,
        r"lam must be a finite number, got nan"),
    bad("rsam_perturb_:eps=inf", lambda: O.rsam_perturb_(*pgs(), 0.1, eps=math.inf), ValueError,
        r"eps must be a finite number >= 0, got inf"),
    bad("rsam_sumsq:lam=nan", lambda: O.rsam_sumsq(*pgs(), math.nan), ValueError,
        r"rsam_sumsq: lam must be a finite number, got nan"),
    bad("rsam_sumsq:stash-length", lambda: O.rsam_sumsq(*pgs()[:2], lst(4)), ValueError,
        r"stash has 1 tensors but params has 2"),
    bad("gsam_sums:old_grads-length", lambda: O.gsam_sums(lst(4, 3), lst(4)), ValueError,
        r"gsam_sums: old_grads has 1 tensors but grads has 2"),
    bad("gsam_sums:grads-tensor", lambda: O.gsam_sums(torch.randn(3), lst(3)), TypeError,
        r"gsam_sums: grads must be a list or tuple of tensors, got Tensor"),
    bad("gsam_combine_:alpha=nan", lambda: gsam(alpha=math.nan), ValueError, r"alpha must be a finite number, got nan"),
    bad("gsam_combine_:alpha-str", lambda: gsam(alpha="0.4"), ValueError, r"alpha must be a finite number, got '0\.4'"),
    bad("gsam_combine_:restore-without-stash", lambda: gsam(stash=[]), ValueError,
        r"restore=True needs one stash tensor per param \(2\), got 0"),
    bad("gsam_combine_:old_grads-length", lambda: O.gsam_combine_(*pgs()[:2], lst(4), lst(4, 3)), ValueError,
        r"old_grads has 1 tensors but params has 2"),
    bad("gsam_combine_:eps=-1", lambda: gsam(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1\.0"),
    bad("gsam_combine_:old_grad_scale-shape", lambda: gsam(old_grad_scale=torch.ones(3)), ValueError,
        r"old_grad_scale must be a one-element floating tensor, got shape \(3,\)"),
    bad("gsam_combine_:stash_mode", lambda: gsam(stash_mode="x"), ValueError, r"stash_mode must be 'copy' .*got 'x'"),
    bad("gsam_restore_sgd_:lr=-0.1", lambda: gsam_sgd(lr=-0.1), ValueError, r"lr\[0\] must be >= 0, got -0\.1"),
    bad("gsam_restore_sgd_:momentum-without-buffers", lambda: gsam_sgd(momentum=0.9), ValueError,
        r"momentum != 0 needs momentum_buffers"),
    bad("gsam_restore_sgd_:alpha=inf", lambda: gsam_sgd(alpha=math.inf), ValueError,
        r"alpha must be a finite number, got inf"),
    bad("gsam_restore_sgd_:weight_decay=-1", lambda: gsam_sgd(weight_decay=-1.0), ValueError,
        r"weight_decay\[0\] must be >= 0, got -1\.0"),
    bad("philox_:kind", lambda: O.philox_(torch.empty(8), 1, kind="gauss"), ValueError,
        r"kind must be one of .*got 'gauss'"),
    bad("philox_:p=1.5", lambda: O.philox_(torch.empty(8), 1, kind="bernoulli", p=1.5), ValueError,
        r"p must be in \[0, 1\], got 1\.5"),
    bad("philox_:words-float-out", lambda: O.philox_(torch.empty(8), 1, kind="words"), TypeError,
        r"kind='words' needs an int64 out, got torch\.float32"),
    bad("philox_:normal-int-out", lambda: O.philox_(torch.empty(8, dtype=torch.long), 1), TypeError,
        r"kind='normal' needs a floating out, got torch\.int64"),
    bad("philox_:out-not-contiguous", lambda: O.philox_(torch.empty(8, 2).t(), 1), ValueError,
        r"out must be contiguous"),
    bad("philox_:out-list", lambda: O.philox_([0.0] * 8, 1), TypeError, r"out must be a tensor, got list"),
    bad("philox_:seed-too-small", lambda: O.philox_(torch.empty(8), -(2**63) - 1), ValueError,
        r"seed must be an integer .*got -9223372036854775809"),
]

BANK_OPS = [
    bad("trajectory_bank_step:values-float64", lambda: bank_step(bank=raw_bank(values=torch.zeros(4, 1, 3,
        dtype=torch.float64))), ValueError, r"bank values must be a contiguous .* got torch\.float64 \(4, 1, 3\)"),
    bad("trajectory_bank_step:epochs-int64", lambda: bank_step(bank=raw_bank(epochs=torch.zeros(4, 1,
        dtype=torch.int64))), ValueError, r"bank epochs must be a contiguous int32 tensor .*got torch\.int64"),
    bad("trajectory_bank_step:state-shape", lambda: bank_step(bank=raw_bank(state=torch.zeros(4, dtype=torch.int64))),
        ValueError, r"bank state must be an int64 tensor of shape \(8,\), got torch\.int64 \(4,\)"),
    bad("trajectory_bank_step:ids-shape", lambda: bank_step(ids=torch.arange(3)), ValueError,
        r"sample ids must have shape \(2,\), got \(3,\)"),
    bad("trajectory_bank_step:temperature=-1", lambda: bank_step(temperature=-1.0), ValueError,
        r"temperature must be > 0, got -1\.0"),
    bad("trajectory_bank_step:epoch-str", lambda: O.trajectory_bank_step(torch.randn(2, 3), None, torch.arange(2),
        *raw_bank(), "0"), ValueError, r"epoch must be an int .*got '0'"),
    bad("trajectory_bank_step:use_past-str", lambda: bank_step(use_past="no"), TypeError,
        r"use_past must be a bool, got 'no'"),
    bad("trajectory_bank_step:record-int", lambda: bank_step(record=1), TypeError, r"record must be a bool, got 1"),
    bad("trajectory_bank_step:soft-shape", lambda: O.trajectory_bank_step(torch.randn(2, 3), torch.rand(2, 4),
        torch.arange(2), *raw_bank(), 0), ValueError, r"probability targets must have the logits' shape \(2, 3\)"),
    bad("trajectory_bank_record:id-out-of-range", lambda: O.trajectory_bank_record(torch.randn(2, 3),
        torch.tensor([0, 9]), *raw_bank(), 0), IndexError,
        r"sample id 9 of row 1 is outside the bank's range \[0, 4\)"),
]

OPTIMIZERS = [
    bad("SAM:rho=-0.1", lambda: SAM(params(), SGD, rho=-0.1, lr=0.1), ValueError,
        r"SAM: rho must be a finite number >= 0, got -0\.1"),
    bad("SAM:rho=nan", lambda: SAM(params(), SGD, rho=math.nan, lr=0.1), ValueError,
        r"rho must be a finite number >= 0, got nan"),
    bad("SAM:rho-str", lambda: SAM(params(), SGD, rho="0.05", lr=0.1), ValueError,
        r"rho must be a finite number >= 0, got '0\.05'"),
    bad("SAM:eta=-1", lambda: SAM(params(), SGD, eta=-1.0, lr=0.1), ValueError,
        r"eta must be a finite number >= 0, got -1\.0"),
    bad("SAM:perturb_eps=-1", lambda: SAM(params(), SGD, perturb_eps=-1.0, lr=0.1), ValueError,
        r"perturb_eps must be a finite number >= 0, got -1\.0"),
    bad("SAM:base-optimizer-instance", lambda: SAM(params(), SGD(params(), lr=0.1), lr=0.1), TypeError,
        r"base_optimizer must be an optimizer class such as torch\.optim\.SGD, got SGD"),
    bad("SAM:base-optimizer-str", lambda: SAM(params(), "SGD", lr=0.1), TypeError,
        r"base_optimizer must be an optimizer class .*got 'SGD'"),
    bad("SAM:base-optimizer-module", lambda: SAM(params(), torch.nn.Linear, lr=0.1), TypeError,
        r"base_optimizer must be an optimizer class .*Linear"),
    bad("SAM:stash_mode", lambda: SAM(params(), SGD, stash_mode="swap", lr=0.1), ValueError,
        r"stash_mode must be 'copy' or 'delta', got 'swap'"),
    bad("SAM:stash_dtype-with-copy", lambda: SAM(params(), SGD, stash_dtype=torch.bfloat16, lr=0.1), ValueError,
        r"stash_dtype applies to stash_mode='delta' only"),
    bad("SAM:fused_step-RMSprop", lambda: SAM(params(), torch.optim.RMSprop, fused_step=True, lr=0.1), ValueError,
        r"fused_step=True supports torch\.optim\.SGD, torch\.optim\.AdamW and torch\.optim\.Adam base "
        r"optimizers, got RMSprop"),
    bad("SAM:fused_step-Adam-L2", lambda: SAM(params(), torch.optim.Adam, fused_step=True, lr=0.1, weight_decay=0.1),
        ValueError, r"fused_step=True with torch\.optim\.Adam needs weight_decay=0 .*got weight_decay=0\.1"),
    bad("SAM:fused_step-amsgrad", lambda: SAM(params(), AdamW, fused_step=True, amsgrad=True, lr=0.1), ValueError,
        r"fused_step=True does not support .*amsgrad"),
    bad("SAM:group-rho", lambda: SAM([{"params": list(params()), "rho": -1.0}], SGD, lr=0.1), ValueError,
        r"param_groups\[0\]\['rho'\] must be a finite number >= 0, got -1\.0"),
    bad("SAM:group-eta", lambda: SAM([{"params": list(params()), "eta": math.inf}], SGD, lr=0.1), ValueError,
        r"param_groups\[0\]\['eta'\] must be a finite number >= 0, got inf"),
    bad("SAM:lr=-1(base)", lambda: SAM(params(), SGD, lr=-1.0), ValueError, r"Invalid learning rate: -1\.0"),
    bad("SAM.step:backend", lambda: optimizer_step(lambda p: SAM(p, SGD, lr=0.1, backend="gpu")), ValueError,
        r"unknown backend 'gpu'"),
    bad("SAM:stash_dtype-int", lambda: SAM(params(), SGD, lr=0.1, stash_mode="delta", stash_dtype=torch.int32),
        TypeError, r"SAM: stash_dtype must be one of torch\.float32, .* or None, got torch\.int32"),
    bad("SAM:adaptive-str", lambda: SAM(params(), SGD, adaptive="no", lr=0.1), TypeError, r"SAM: adaptive must be a bool \(True or False\), got 'no'"),
    bad("SAM:stash_dtype-str", lambda: SAM(params(), SGD, stash_mode="delta", stash_dtype="bf16", lr=0.1), TypeError,
        r"SAM: stash_dtype must be one of .*got 'bf16'"),
    bad("SAM:fused_step-str", lambda: SAM(params(), SGD, fused_step="yes", lr=0.1), TypeError,
        r"SAM: fused_step must be a bool \(True or False\), got 'yes'"),
    bad("SAM:nesterov-without-momentum", lambda: SAM(params(), SGD, nesterov=True, lr=0.1), ValueError,
        r"Nesterov momentum requires a momentum"),
    bad("SAM:model-str", lambda: SAM(params(), SGD, model="net", lr=0.1), TypeError,
        r"SAM: model must be a torch\.nn\.Module or None, got str"),
    bad("SAM:sync_first_pass=1", lambda: SAM(params(), SGD, sync_first_pass=1, lr=0.1), TypeError,
        r"SAM: sync_first_pass must be a bool .*got 1"),
    bad("SAM:backend", lambda: SAM(params(), SGD, backend="gpu", lr=0.1), ValueError, r"SAM: unknown backend 'gpu'"),
    bad("SAM:add_param_group-rho", lambda: SAM([model().weight], SGD, lr=0.1).add_param_group(
        {"params": [model().bias], "rho": -2.0}), ValueError,
        r"param_groups\[1\]\['rho'\] must be a finite number >= 0, got -2\.0"),
    bad("SAM.first_step:zero_grad-str", lambda: SAM(params(), SGD, lr=0.1).first_step(zero_grad="no"), TypeError,
        r"SAM\.first_step: zero_grad must be a bool .*got 'no'"),
    bad("SAM.first_step:grad_scaler", lambda: SAM(params(), SGD, lr=0.1).first_step(grad_scaler=2.0), TypeError,
        r"SAM\.first_step: grad_scaler must be a torch\.amp\.GradScaler or None, got 2\.0"),
    bad("SAM.step:closure-not-callable", lambda: SAM(params(), SGD, lr=0.1).step(3), TypeError,
        r"SAM\.step: closure must be callable .*got 3"),
    bad("ASAM:adaptive", lambda: ASAM(params(), SGD, adaptive=False, lr=0.1), TypeError, r"ASAM is always adaptive"),
    bad("ASAM:eta=-1", lambda: ASAM(params(), SGD, eta=-1.0, lr=0.1), ValueError,
        r"ASAM: eta must be a finite number >= 0, got -1\.0"),
    bad("ASAM:rho=-1", lambda: ASAM(params(), SGD, rho=-1.0, lr=0.1), ValueError,
        r"ASAM: rho must be a finite number >= 0, got -1\.0"),
    bad("ASAM:adaptive_filter-not-callable", lambda: ASAM(params(), SGD, adaptive_filter=3, lr=0.1), TypeError,
        r"ASAM: adaptive_filter must be callable \(param -> bool\) or None, got 3"),
    bad("ESAM:beta=0", lambda: ESAM(params(), SGD, beta=0.0, lr=0.1), ValueError,
        r"beta must be in \(0, 1\], got 0\.0"),
    bad("ESAM:beta=1.5", lambda: ESAM(params(), SGD, beta=1.5, lr=0.1), ValueError,
        r"beta must be in \(0, 1\], got 1\.5"),
    bad("ESAM:gamma=0", lambda: ESAM(params(), SGD, gamma=0.0, lr=0.1), ValueError,
        r"gamma must be in \(0, 1\], got 0\.0"),
    bad("ESAM:gamma=nan", lambda: ESAM(params(), SGD, gamma=math.nan, lr=0.1), ValueError,
        r"gamma must be in \(0, 1\], got nan"),
    bad("ESAM:rho=-0.1", lambda: ESAM(params(), SGD, rho=-0.1, lr=0.1), ValueError,
        r"rho must be a finite number >= 0, got -0\.1"),
    bad("ESAM:eta=-1", lambda: ESAM(params(), SGD, eta=-1, lr=0.1), ValueError,
        r"eta must be a finite number >= 0, got -1"),
    bad("ESAM:swp", lambda: ESAM(params(), SGD, swp="layer", lr=0.1), ValueError,
        r"swp must be 'element' or 'tensor', got 'layer'"),
    bad("ESAM:seed=1.5", lambda: ESAM(params(), SGD, seed=1.5, lr=0.1), TypeError,
        r"seed must be an int or None, got 1\.5"),
    bad("ESAM:perturb_eps=nan", lambda: ESAM(params(), SGD, perturb_eps=math.nan, lr=0.1), ValueError,
        r"perturb_eps must be a finite number >= 0, got nan"),
    bad("ESAM:group-beta", lambda: ESAM([{"params": list(params()), "beta": 0}], SGD, lr=0.1), ValueError,
        r"param_groups\[0\]\['beta'\] must be in \(0, 1\], got 0"),
    bad("ESAM:base-optimizer-None", lambda: ESAM(params(), None, lr=0.1), TypeError,
        r"base_optimizer must be an optimizer class .*got None"),
    bad("RSAM:rho=-1", lambda: RSAM(params(), SGD, rho=-1.0, lr=0.1), ValueError,
        r"rho must be a finite number >= 0, got -1\.0"),
    bad("RSAM:lam=nan", lambda: RSAM(params(), SGD, lam=math.nan, lr=0.1), ValueError,
        r"lam must be a finite number, got nan"),
    bad("RSAM:noise_std=-1", lambda: RSAM(params(), SGD, noise_std=-1.0, lr=0.1), ValueError,
        r"noise_std must be a finite number >= 0, got -1\.0"),
    bad("RSAM:noise_std-triple", lambda: RSAM(params(), SGD, noise_std=(1e-3, 2e-3, 3e-3), lr=0.1), ValueError,
        r"noise_std as a pair is \(start, end\), got \(0\.001, 0\.002, 0\.003\)"),
    bad("RSAM:noise_std-pair-without-total_steps", lambda: RSAM(params(), SGD, noise_std=(1e-3, 2e-3), lr=0.1),
        ValueError, r"noise_std=\(start, end\) needs total_steps"),
    bad("RSAM:total_steps=0", lambda: RSAM(params(), SGD, noise_std=(1e-3, 2e-3), total_steps=0, lr=0.1),
        ValueError, r"total_steps must be an int >= 1, got 0"),
    bad("RSAM:rho_scheduler", lambda: RSAM(params(), SGD, rho_scheduler=3, lr=0.1), TypeError,
        r"RSAM: rho_scheduler must be callable \(lr, step\) -> rho or None, got 3"),
    bad("RSAM:seed-str", lambda: RSAM(params(), SGD, seed="x", lr=0.1), TypeError,
        r"seed must be an int or None, got 'x'"),
    bad("RSAM:perturb_eps=-1", lambda: RSAM(params(), SGD, perturb_eps=-1, lr=0.1), ValueError,
        r"perturb_eps must be a finite number >= 0, got -1"),
    bad("RSAM:base-optimizer-object", lambda: RSAM(params(), object, lr=0.1), TypeError,
        r"base_optimizer must be an optimizer class .*object"),
    bad("GSAM:alpha=nan", lambda: GSAM(params(), SGD, alpha=math.nan, lr=0.1), ValueError,
        r"alpha must be a finite number, got nan"),
    bad("GSAM:rho=-1", lambda: GSAM(params(), SGD, rho=-1.0, lr=0.1), ValueError,
        r"rho must be a finite number >= 0, got -1\.0"),
    bad("GSAM:rho_scheduler", lambda: GSAM(params(), SGD, rho_scheduler="x", lr=0.1), TypeError,
        r"rho_scheduler must be callable .*got 'x'"),
    bad("GSAM:alpha-per-group", lambda: GSAM([{"params": [model().weight]}, {"params": [model().bias], "alpha": 0.1}],
        SGD, lr=0.1), ValueError, r"alpha must be the same for every group .*got \[0\.1, 0\.4\]"),
    bad("GSAM:perturb_eps=-1", lambda: GSAM(params(), SGD, perturb_eps=-1.0, lr=0.1), ValueError,
        r"perturb_eps must be a finite number >= 0, got -1\.0"),
    bad("GSAM:base-optimizer-instance", lambda: GSAM(params(), SGD(params(), lr=0.1)), TypeError,
        r"base_optimizer must be an optimizer class .*got SGD"),
    bad("GSAM:fused_step-Adam-L2", lambda: GSAM(params(), torch.optim.Adam, fused_step=True, lr=0.1,
        weight_decay=0.1), ValueError, r"fused_step=True with torch\.optim\.Adam needs weight_decay=0"),
    bad("GSAM:copy_first_grads-str", lambda: GSAM(params(), SGD, copy_first_grads="yes", lr=0.1), TypeError,
        r"GSAM: copy_first_grads must be a bool .*got 'yes'"),
    bad("GSAM:adaptive=1", lambda: GSAM(params(), SGD, adaptive=1, lr=0.1), TypeError,
        r"GSAM: adaptive must be a bool .*got 1"),
    bad("RSAM:total_steps=2.5", lambda: RSAM(params(), SGD, noise_std=(1e-3, 2e-3), total_steps=2.5, lr=0.1),
        ValueError, r"RSAM: total_steps must be an int >= 1, got 2\.5"),
    bad("RSAM:lam=True", lambda: RSAM(params(), SGD, lam=True, lr=0.1), ValueError,
        r"RSAM: lam must be a finite number, got True"),
    bad("ESAM:adaptive-str", lambda: ESAM(params(), SGD, adaptive="no", lr=0.1), TypeError,
        r"ESAM: adaptive must be a bool .*got 'no'"),
    bad("ESAM.step:closure-not-callable", lambda: ESAM(params(), SGD, lr=0.1).step(3), TypeError,
        r"ESAM\.step: closure must be callable .*got 3"),
    bad("per_sample_closure:loss_fn", lambda: per_sample_closure(model(), torch.randn(4, 3), y(4, 2), "ce"),
        TypeError, r"per_sample_closure: loss_fn must be callable .*got 'ce'"),
    bad("index_batch:idx-float", lambda: index_batch(torch.randn(4, 3), torch.arange(2.0)), TypeError,
        r"index_batch: idx must be None or a 1-D int64/int32 tensor .*got torch\.float32 \(2,\)"),
    bad("ProportionScheduler:max_lr<min_lr", lambda: ProportionScheduler(max_lr=0.1, min_lr=0.2), ValueError,
        r"max_lr must be > min_lr, got max_lr=0\.1, min_lr=0\.2"),
    bad("ProportionScheduler:max_value=-1", lambda: ProportionScheduler(max_lr=0.1, max_value=-1.0), ValueError,
        r"values must be >= 0, got max_value=-1\.0"),
    bad("ProportionScheduler:warmup_steps=-1", lambda: ProportionScheduler(max_lr=0.1, warmup_steps=-1), ValueError,
        r"warmup_steps must be an int >= 0, got -1"),
    bad("ProportionScheduler:max_lr=nan", lambda: ProportionScheduler(max_lr=math.nan), ValueError,
        r"max_lr must be a finite number, got nan"),
    bad("CosineIncrease:start=-1", lambda: CosineIncrease(-1.0, 1.0, 10), ValueError,
        r"values must be >= 0, got start=-1\.0, end=1\.0"),
    bad("CosineIncrease:total_steps=0", lambda: CosineIncrease(0.1, 1.0, 0), ValueError,
        r"total_steps must be an int >= 1, got 0"),
    bad("CosineIncrease:start=nan", lambda: CosineIncrease(math.nan, 1.0, 10), ValueError,
        r"start must be a finite number, got nan"),
]

SHARPNESS = [
    bad("hessian_top_eigenvalue:model", lambda: sharpness.hessian_top_eigenvalue("model", CE, data()), TypeError,
        r"model must be an nn\.Module, got str"),
    bad("hessian_top_eigenvalue:iters=0", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(), iters=0),
        ValueError, r"hessian_top_eigenvalue: iters must be an int >= 1, got 0"),
    bad("hessian_top_eigenvalue:max_batches=0", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(),
        max_batches=0), ValueError, r"max_batches must be an int >= 1, got 0"),
    bad("hessian_top_eigenvalue:no-batches", lambda: sharpness.hessian_top_eigenvalue(model(), CE, []), ValueError,
        r"the data iterable yielded no batches"),
    bad("hessian_top_eigenvalue:no-trainable-parameters", lambda: sharpness.hessian_top_eigenvalue(
        model().requires_grad_(False), CE, data()), ValueError, r"the model has no trainable parameters"),
    bad("hessian_top_eigenvalue:train_mode-str", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(),
        train_mode="no"), TypeError, r"hessian_top_eigenvalue: train_mode must be a bool .*got 'no'"),
    bad("max_loss_increase:seed=1.5", lambda: sharpness.max_loss_increase(model(), CE, data(), seed=1.5),
        ValueError, r"max_loss_increase: seed must be an int, got 1\.5"),
    bad("hessian_top_eigenvalue:iters=1.5", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(), iters=1.5),
        ValueError, r"iters.*1\.5"),
    bad("hessian_top_eigenvalue:max_batches=1.5", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(),
        max_batches=1.5), ValueError, r"max_batches.*1\.5"),
    bad("hessian_top_eigenvalue:tol=-1", lambda: sharpness.hessian_top_eigenvalue(model(), CE, data(), tol=-1.0,
        iters=2), ValueError, r"tol.*-1\.0"),
    bad("hessian_top_eigenvalue:loss_fn-not-callable", lambda: sharpness.hessian_top_eigenvalue(model(), "ce",
        data()), TypeError, r"loss_fn"),
    bad("max_loss_increase:rho=0", lambda: sharpness.max_loss_increase(model(), CE, data(), rho=0.0), ValueError,
        r"rho must be a finite number > 0, got 0\.0"),
    bad("max_loss_increase:rho=nan", lambda: sharpness.max_loss_increase(model(), CE, data(), rho=math.nan),
        ValueError, r"rho must be a finite number > 0, got nan"),
    bad("max_loss_increase:steps=0", lambda: sharpness.max_loss_increase(model(), CE, data(), steps=0), ValueError,
        r"steps must be an int >= 1, got 0"),
    bad("max_loss_increase:model", lambda: sharpness.max_loss_increase(None, CE, data()), TypeError,
        r"model must be an nn\.Module, got NoneType"),
    bad("max_loss_increase:max_batches=-1", lambda: sharpness.max_loss_increase(model(), CE, data(), max_batches=-1),
        ValueError, r"max_batches must be an int >= 1, got -1"),
    bad("max_loss_increase:no-batches", lambda: sharpness.max_loss_increase(model(), CE, iter([])), ValueError,
        r"the data iterable yielded no batches"),
    bad("max_loss_increase:rho=True", lambda: sharpness.max_loss_increase(model(), CE, data(), rho=True, steps=1),
        ValueError, r"rho must be a finite number > 0, got True"),
    bad("max_loss_increase:steps=2.5", lambda: sharpness.max_loss_increase(model(), CE, data(), steps=2.5),
        ValueError, r"steps.*2\.5"),
]

def cli_error(main, argv):
    """argparse's error exits with status 2 after printing the message to stderr: re-raised as a
    ValueError carrying that message (so that the table can match it)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            if e.code == 2:
                raise ValueError(err.getvalue()) from None
            raise


def step_callables(*args, **kw):
    from saf_kernels.bench.sam_steps import step_callables as f

    return f(*args, **kw)


def bench_steps(**kw):
    return step_callables(model(), CE, (torch.randn(4, 3), torch.randint(0, 2, (4,))), "cpu", **kw)


def bench_main(name):
    import importlib

    return importlib.import_module(f"saf_kernels.bench.{name}").main


def check_main():
    from saf_kernels import check

    return check.main


BENCH = [
    bad("step_callables:model", lambda: step_callables(
        "net", CE, (torch.randn(4, 3), torch.randint(0, 2, (4,))), "cpu"), TypeError,
        r"step_callables: model must be a torch\.nn\.Module, got str"),
    bad("step_callables:loss_fn", lambda: step_callables(
        model(), "ce", (torch.randn(4, 3), torch.randint(0, 2, (4,))), "cpu"), TypeError,
        r"step_callables: loss_fn must be callable .*got 'ce'"),
    bad("step_callables:batch", lambda: step_callables(
        model(), CE, torch.randn(4, 3), "cpu"), TypeError, r"step_callables: batch must be a pair .*got Tensor"),
    bad("step_callables:device", lambda: step_callables(
        model(), CE, (torch.randn(4, 3), torch.randint(0, 2, (4,))), "gpu0"), ValueError,
        r"step_callables: device must be a torch\.device or a device string .*got 'gpu0'"),
    bad("step_callables:lr=-1", lambda: bench_steps(lr=-1.0), ValueError,
        r"step_callables: lr must be a finite number >= 0, got -1\.0"),
    bad("step_callables:rho=True", lambda: bench_steps(rho=True), ValueError,
        r"step_callables: rho must be a finite number >= 0, got True"),
    bad("step_callables:fused_step-str", lambda: bench_steps(fused_step="yes"), TypeError,
        r"step_callables: fused_step must be a bool .*got 'yes'"),
    bad("step_callables:backend", lambda: bench_steps(backend="gpu"), ValueError, r"unknown backend 'gpu'"),
    bad("step_callables:extra=1", lambda: bench_steps(extra=1), TypeError,
        r"step_callables: extra must be a bool .*got 1"),
    bad("sam_steps.main:rounds=0", lambda: cli_error(bench_main("sam_steps"), ["--rounds", "0"]), ValueError,
        r"--rounds must be >= 1, got 0"),
    bad("sam_steps.main:batch=-1", lambda: cli_error(bench_main("sam_steps"), ["--batch", "-1"]), ValueError,
        r"--batch must be >= 1, got -1"),
    bad("esam_steps.main:methods", lambda: cli_error(bench_main("esam_steps"), ["--methods", "sgd,lion"]),
        ValueError, r"unknown methods \['lion'\]"),
    bad("esam_steps.main:inner=0", lambda: cli_error(bench_main("esam_steps"), ["--inner", "0"]), ValueError,
        r"--inner must be >= 1, got 0"),
    bad("check.main:backend", lambda: cli_error(check_main(), ["--backend", "gpu"]), ValueError,
        r"argument --backend: invalid choice: 'gpu'"),
    bad("check.main:require", lambda: cli_error(check_main(), ["--require", "tpu"]), ValueError,
        r"argument --require: invalid choice: 'tpu'"),
    bad("check.main:ops", lambda: cli_error(check_main(), ["--ops", "nope"]), ValueError,
        r"argument --ops: invalid choice: 'nope'"),
    bad("bench.main:ops", lambda: cli_error(bench_main("__main__"), ["--ops", "nope"]), ValueError,
        r"unknown ops \['nope'\]"),
    bad("bench.main:methods", lambda: cli_error(bench_main("__main__"), ["--methods", "lion"]), ValueError,
        r"unknown methods \['lion'\]"),
]

# ---------------------------------------------------------------------------------------------
# Physical networks (saf_kernels.physical) and the trainer integrations
# ---------------------------------------------------------------------------------------------


def mrr_net():
    return torch.nn.Sequential(ph.MRRLinear(4, 3))


def fs_net():
    return torch.nn.Sequential(ph.FreeSpaceLinear((4, 4), 3))


def batches():
    return [(torch.randn(2, 4), torch.tensor([0, 1]))]


def knob(**kw):
    return ph.Knob(torch.zeros(1), **{"delta_max": 0.1, "c": 1.0, **kw})


def enter(cm):
    with cm:
        pass


PHYSICAL = [
    bad("MRRLinear:in_features=0", lambda: ph.MRRLinear(0, 3), ValueError, r"MRRLinear: in_features must be an int >= 1, got 0"),
    bad("MRRLinear:in_features=2.5", lambda: ph.MRRLinear(2.5, 3), ValueError, r"in_features must be an int >= 1, got 2\.5"),
    bad("MRRLinear:out_features=True", lambda: ph.MRRLinear(4, True), ValueError, r"out_features must be an int >= 1, got True"),
    bad("MRRLinear:bias=str", lambda: ph.MRRLinear(4, 3, bias="no"), TypeError, r"bias must be a bool .*got 'no'"),
    bad("MRRLinear:drift=nan", lambda: ph.MRRLinear(4, 3, drift_per_kelvin=math.nan), ValueError,
        r"drift_per_kelvin must be a finite number, got nan"),
    bad("MRRLinear:transfer", lambda: ph.MRRLinear(4, 3, transfer=1), TypeError, r"transfer must be a Lorentzian, got 1"),
    bad("MRRLinear:weight-shape", lambda: ph.MRRLinear(4, 3, weight=torch.zeros(2, 2)), ValueError,
        r"MRRLinear: weight has shape \(2, 2\), the layer's \(3, 4\)"),
    bad("MRRConv2d:kernel_size=0", lambda: ph.MRRConv2d(2, 3, 0), ValueError, r"kernel_size must be positive, got 0"),
    bad("MRRConv2d:groups=3", lambda: ph.MRRConv2d(2, 3, 3, groups=3), ValueError, r"groups=3 must divide"),
    bad("MRRConv2d:stride=0", lambda: ph.MRRConv2d(2, 3, 3, stride=0), ValueError, r"stride must be positive, got 0"),
    bad("MRRConv2d:padding=-1", lambda: ph.MRRConv2d(2, 3, 3, padding=-1), ValueError, r"padding must be >= 0, got -1"),
    bad("MRRConv2d:padding=str", lambda: ph.MRRConv2d(2, 3, 3, padding="full"), ValueError,
        r"padding must be 'same', 'valid', an int or a pair, got 'full'"),
    bad("Lorentzian:gamma=0", lambda: ph.Lorentzian(gamma=0), ValueError, r"Lorentzian: gamma must be > 0, got 0"),
    bad("Lorentzian:amplitude=True", lambda: ph.Lorentzian(amplitude=True), ValueError,
        r"amplitude must be a finite number, got True"),
    bad("MRRLayer.set_weights:clamp=0", lambda: ph.MRRLinear(4, 3).set_weights(torch.zeros(3, 4), clamp=0),
        ValueError, r"set_weights: clamp must be > 0, got 0"),
    bad("MRRLayer.set_weights:clamp=1", lambda: ph.MRRLinear(4, 3).set_weights(torch.zeros(3, 4), clamp=1.0),
        ValueError, r"set_weights: clamp must be below the ring's amplitude 1\.0, got 1\.0"),
    bad("MRRLayer.set_weights:shape", lambda: ph.MRRLinear(4, 3).set_weights(torch.zeros(2, 4)), ValueError,
        r"set_weights: weight has shape \(2, 4\)"),
    bad("MRRLayer.set_drift:inf", lambda: ph.MRRLinear(4, 3).set_drift(math.inf), ValueError,
        r"set_drift: delta_t must be a finite number, got inf"),
    bad("MRRLayer.sample_offsets:sigma", lambda: ph.MRRLinear(4, 3).sample_offsets(-1.0), ValueError,
        r"sample_offsets: sigma must be >= 0, got -1\.0"),
    bad("MRRLayer.sample_offsets:generator", lambda: ph.MRRLinear(4, 3).sample_offsets(0.1, generator=1), TypeError,
        r"sample_offsets: generator must be a torch\.Generator or None, got int"),
    bad("FreeSpaceLinear:out_features=0", lambda: ph.FreeSpaceLinear((4, 4), 0), ValueError,
        r"FreeSpaceLinear: out_features must be an int >= 1, got 0"),
    bad("FreeSpaceLinear:in_shape", lambda: ph.FreeSpaceLinear((0, 4), 3), ValueError, r"in_shape must be positive"),
    bad("FreeSpaceLinear:in_shape=2.5", lambda: ph.FreeSpaceLinear(2.5, 3), ValueError,
        r"in_shape must be an int or a pair of ints, got 2\.5"),
    bad("FreeSpaceLinear:max_weight", lambda: ph.FreeSpaceLinear((4, 4), 3, max_weight=-1), ValueError,
        r"max_weight must be > 0, got -1"),
    bad("FreeSpaceLinear:interpolation", lambda: ph.FreeSpaceLinear((4, 4), 3, interpolation="cubic"), ValueError,
        r"interpolation must be one of .*got 'cubic'"),
    bad("FreeSpaceLinear:grid", lambda: ph.FreeSpaceLinear((4, 4), 3, grid=(0, 1)), ValueError, r"grid must be positive"),
    bad("FreeSpaceLinear:bias=2", lambda: ph.FreeSpaceLinear((4, 4), 3, bias=2), TypeError,
        r"bias must be a bool .*got 2"),
    bad("FreeSpaceLinear.set_misalignment:scale", lambda: ph.FreeSpaceLinear((4, 4), 3).set_misalignment(scale=0),
        ValueError, r"set_misalignment: scale must be > 0, got 0"),
    bad("FreeSpaceLinear.set_misalignment:rotation",
        lambda: ph.FreeSpaceLinear((4, 4), 3).set_misalignment(rotation=math.nan), ValueError,
        r"rotation must be a finite number, got nan"),
    bad("misalign_kernels:interpolation", lambda: ph.misalign_kernels(torch.randn(2, 3, 3), 4, 2, interpolation="x"),
        ValueError, r"interpolation must be one of .*got 'x'"),
    bad("misalign_kernels:tile", lambda: ph.misalign_kernels(torch.randn(2, 3, 3), 0, 2), ValueError,
        r"misalign_kernels: tile must be positive, got 0"),
    bad("misalign_kernels:scale", lambda: ph.misalign_kernels(torch.randn(2, 3, 3), 4, 2, scale=0), ValueError,
        r"misalign_kernels: scale must be > 0, got 0"),
    bad("misalign_kernels:rotation", lambda: ph.misalign_kernels(torch.randn(2, 3, 3), 4, 2, rotation=math.inf),
        ValueError, r"misalign_kernels: rotation must be a finite number, got inf"),
    bad("misalign_kernels:kernels", lambda: ph.misalign_kernels(torch.randn(3, 3), 4, 2), ValueError,
        r"kernels must be \[O, kh, kw\], got shape \(3, 3\)"),
    bad("Knob:tensor", lambda: ph.Knob(torch.zeros(2), 0.1, 1.0), ValueError, r"tensor must be a one-element floating"),
    bad("Knob:delta_max=0", lambda: knob(delta_max=0.0), ValueError, r"delta_max must be > 0, got 0\.0"),
    bad("Knob:c=-1", lambda: knob(c=-1.0), ValueError, r"c must be >= 0, got -1\.0"),
    bad("Knob:delta_min", lambda: knob(delta_min=0.2), ValueError, r"delta_min"),
    bad("Knob:bounds", lambda: knob(bounds=(1.0, 0.0)), ValueError, r"bounds must have lo <= hi"),
    bad("ModelFreeAscent:knobs", lambda: ph.ModelFreeAscent([]), ValueError, r"knobs must be a non-empty list of Knob"),
    bad("ModelFreeAscent:seed=1.5", lambda: ph.ModelFreeAscent(knob(), seed=1.5), ValueError,
        r"ModelFreeAscent: seed must be an int, got 1\.5"),
    bad("ModelFreeAscent:cycle=str", lambda: ph.ModelFreeAscent(knob(), cycle="y"), TypeError,
        r"cycle must be a bool .*got 'y'"),
    bad("accuracy:model", lambda: ph.accuracy(1, batches()), TypeError, r"accuracy: model must be a torch\.nn\.Module, got int"),
    bad("accuracy:data", lambda: ph.accuracy(mrr_net(), []), ValueError, r"accuracy: data holds no batches"),
    bad("accuracy:train_mode", lambda: ph.accuracy(mrr_net(), batches(), train_mode="y"), TypeError,
        r"train_mode must be a bool .*got 'y'"),
    bad("sweep:perturb", lambda: ph.sweep(mrr_net(), batches(), [0.1], 1), TypeError, r"sweep: perturb must be a callable"),
    bad("drift_sweep:delta_ts=[]", lambda: ph.drift_sweep(mrr_net(), batches(), []), ValueError, r"delta_ts is empty"),
    bad("drift_sweep:delta_ts=nan", lambda: ph.drift_sweep(mrr_net(), batches(), [math.nan]), ValueError,
        r"delta_ts\[0\] must be a finite number, got nan"),
    bad("fabrication_sweep:devices=True", lambda: ph.fabrication_sweep(mrr_net(), batches(), [0.1], devices=True),
        ValueError, r"devices must be an int >= 1, got True"),
    bad("fabrication_sweep:seed=1.5", lambda: ph.fabrication_sweep(mrr_net(), batches(), [0.1], seed=1.5), ValueError,
        r"fabrication_sweep: seed must be an int, got 1\.5"),
    bad("fabrication_sweep:sigmas", lambda: ph.fabrication_sweep(mrr_net(), batches(), [-1.0]), ValueError,
        r"sigmas\[0\] must be >= 0, got -1\.0"),
    bad("misalignment_sweep:kind", lambda: ph.misalignment_sweep(fs_net(), batches(), [0.1], kind="tilt"), ValueError,
        r"kind must be one of .*got 'tilt'"),
    bad("misalignment_sweep:values", lambda: ph.misalignment_sweep(fs_net(), batches(), "a"), ValueError,
        r"values must be a sequence of numbers, got 'a'"),
    bad("thermal_drift:delta_t", lambda: enter(ph.thermal_drift(mrr_net(), math.nan)), ValueError,
        r"thermal_drift: delta_t must be a finite number, got nan"),
    bad("thermal_drift:layers", lambda: enter(ph.thermal_drift(mrr_net(), 1.0, layers=["nope"])), ValueError,
        r"the model has no layer named 'nope'"),
    bad("thermal_drift:model", lambda: enter(ph.thermal_drift(1, 1.0)), TypeError, r"model must be a torch\.nn\.Module"),
    bad("fabrication_variance:sigma", lambda: enter(ph.fabrication_variance(mrr_net(), -1.0)), ValueError,
        r"sigma must be >= 0, got -1\.0"),
    bad("fabrication_variance:seed", lambda: enter(ph.fabrication_variance(mrr_net(), 0.1, seed=1.5)), ValueError,
        r"fabrication_variance: seed must be an int, got 1\.5"),
    bad("fabrication_variance:generator", lambda: enter(ph.fabrication_variance(mrr_net(), 0.1, generator=1)),
        TypeError, r"fabrication_variance: generator must be a torch\.Generator or None, got int"),
    bad("misalignment:none", lambda: enter(ph.misalignment(fs_net())), ValueError, r"give at least one of"),
    bad("misalignment:scale", lambda: enter(ph.misalignment(fs_net(), scale=0)), ValueError, r"scale must be > 0, got 0"),
    bad("deploy_weights:clamp=0", lambda: ph.deploy_weights(mrr_net(), torch.nn.Sequential(torch.nn.Linear(4, 3)),
                                                           clamp=0), ValueError, r"deploy_weights: clamp must be > 0"),
    bad("deploy_weights:clamp=1.5", lambda: ph.deploy_weights(mrr_net(), torch.nn.Sequential(torch.nn.Linear(4, 3)),
                                                             clamp=1.5), ValueError,
        r"deploy_weights: clamp must be below the ring's amplitude 1\.0, got 1\.5"),
    bad("deploy_weights:trained", lambda: ph.deploy_weights(mrr_net(), 1), TypeError,
        r"deploy_weights: trained must be a torch\.nn\.Module, got int"),
    bad("sat_param_groups:digital_rho", lambda: ph.sat_param_groups(mrr_net(), digital_rho=-1), ValueError,
        r"digital_rho must be >= 0, got -1"),
    bad("sat_param_groups:digital_rho=True", lambda: ph.sat_param_groups(mrr_net(), digital_rho=True), ValueError,
        r"digital_rho must be a finite number, got True"),
    bad("sat_param_groups:model", lambda: ph.sat_param_groups(1), TypeError, r"sat_param_groups: model must be a torch\.nn\.Module"),
    bad("sat_param_groups:no-controls", lambda: ph.sat_param_groups(torch.nn.Linear(2, 2)), ValueError,
        r"no physical layers with trainable controls"),
    bad("control_parameters:model", lambda: ph.control_parameters(1), TypeError, r"control_parameters: model must be"),
    bad("digital_parameters:model", lambda: ph.digital_parameters(1), TypeError, r"digital_parameters: model must be"),
    bad("constrain_:model", lambda: ph.constrain_(1), TypeError, r"constrain_: model must be a torch\.nn\.Module"),
    bad("first_pass:model", lambda: enter(first_pass(1)), TypeError, r"first_pass: model must be a torch\.nn\.Module or None"),
    bad("first_pass:sync", lambda: enter(first_pass(None, sync="no")), TypeError, r"first_pass: sync must be"),
    bad("frozen_bn_stats:model", lambda: enter(frozen_bn_stats(1)), TypeError,
        r"frozen_bn_stats: model must be a torch\.nn\.Module, got int"),
    bad("default_adaptive_filter:p", lambda: default_adaptive_filter(1), TypeError,
        r"default_adaptive_filter: p must be a tensor"),
    bad("sat_step:optimizer", lambda: ph.sat_step(torch.optim.SGD(mrr_net().parameters(), lr=0.1), lambda: 0),
        TypeError, r"sat_step: optimizer must be a saf_kernels\.optim two-pass optimizer .*got SGD"),
    bad("sat_step:loss_fn", lambda: ph.sat_step(SAM(mrr_net().parameters(), SGD, lr=0.1), 1), TypeError,
        r"sat_step: loss_fn must be a callable"),
    bad("sat_step:model", lambda: ph.sat_step(SAM(mrr_net().parameters(), SGD, lr=0.1), lambda: 0, model=1),
        TypeError, r"sat_step: model must be a torch\.nn\.Module or None, got int"),
    bad("sat_step:model_free", lambda: ph.sat_step(SAM(mrr_net().parameters(), SGD, lr=0.1), lambda: 0,
                                                   model_free=1), TypeError,
        r"sat_step: model_free must be a ModelFreeAscent or None, got int"),
    bad("control_hessian_top_eigenvalue:iters", lambda: ph.control_hessian_top_eigenvalue(mrr_net(), CE, batches(),
                                                                                          iters=0),
        ValueError, r"iters must be > 0, got 0"),
    bad("control_hessian_top_eigenvalue:model", lambda: ph.control_hessian_top_eigenvalue(1, CE, batches()),
        TypeError, r"control_hessian_top_eigenvalue: model must be a torch\.nn\.Module"),
]


def _needs(module):
    try:
        __import__(module)
        return []
    except ImportError:
        return [pytest.mark.skip(reason=f"{module} is not installed (make integrations)")]


def hf_trainer(**kw):
    from saf_kernels.integrations.hf import SharpnessAwareTrainer

    return SharpnessAwareTrainer(**kw)


def saf_callback(method):
    from saf_kernels.integrations.lightning import SAFCallback

    return SAFCallback(method)


INTEGRATIONS = [
    pytest.param(*r.values, id=r.id, marks=list(r.marks) + _needs(mod)) for mod, r in [
        ("transformers", bad("SharpnessAwareTrainer:sam_rho=-1", lambda: hf_trainer(sam_rho=-1), ValueError,
                             r"SharpnessAwareTrainer: sam_rho must be a finite number >= 0, got -1")),
        ("transformers", bad("SharpnessAwareTrainer:sam_rho=True", lambda: hf_trainer(sam_rho=True), ValueError,
                             r"sam_rho must be a finite number >= 0, got True")),
        ("transformers", bad("SharpnessAwareTrainer:sam_kwargs", lambda: hf_trainer(sam_kwargs=[1]), TypeError,
                             r"sam_kwargs must be a dict or None, got list")),
        ("transformers", bad("SharpnessAwareTrainer:sam", lambda: hf_trainer(sam="lookahead"), ValueError,
                             r"sam must be one of .*got 'lookahead'")),
        ("transformers", bad("SharpnessAwareTrainer:mesa", lambda: hf_trainer(mesa=1), TypeError,
                             r"mesa must be a saf_kernels\.MESA, got int")),
        ("lightning", bad("SAFCallback:method", lambda: saf_callback(1), TypeError,
                          r"SAFCallback: method must be a saf_kernels\.SAF or saf_kernels\.MESA, got int")),
    ]
]

# Issue 15: LookSAM, Momentum-SAM, schedules and the parameter filter.
CHEAP = [
    bad("LookSAM:k=0", lambda: LookSAM(params(), SGD, k=0, lr=0.1), ValueError, r"LookSAM: k must be .*>= 1.*got 0"),
    bad("LookSAM:k=2.5", lambda: LookSAM(params(), SGD, k=2.5, lr=0.1), ValueError, r"LookSAM: k must be"),
    bad("LookSAM:alpha=nan", lambda: LookSAM(params(), SGD, alpha=math.nan, lr=0.1), ValueError,
        r"LookSAM: alpha must be a finite number, got nan"),
    bad("LookSAM:every=2", lambda: LookSAM(params(), SGD, every=2, lr=0.1), ValueError,
        r"LookSAM: every=2 does not apply; LookSAM's schedule is k"),
    bad("looksam_combine_:alpha=inf", lambda: O.looksam_combine_([torch.ones(2)], [torch.ones(2)], torch.ones(()),
                                                                  math.inf), ValueError,
        r"looksam_combine_: alpha must be a finite number, got inf"),
    bad("looksam_gv_:gv_norm-int", lambda: O.looksam_gv_([torch.ones(2)], torch.ones((), dtype=torch.int64),
                                                         [torch.ones(2)], [torch.ones(2)]), ValueError,
        r"looksam_gv_: gv_norm must be a one-element floating tensor"),
    bad("SAM:every=0", lambda: SAM(params(), SGD, every=0, lr=0.1), ValueError, r"SAM: every must be .*>= 1.*got 0"),
    bad("SAM:every=True", lambda: SAM(params(), SGD, every=True, lr=0.1), ValueError, r"SAM: every must be"),
    bad("SAM:policy-str", lambda: SAM(params(), SGD, policy="ae", lr=0.1), TypeError,
        r"SAM: policy must be a saf_kernels.optim.AdaptivePolicy or None, got 'ae'"),
    bad("SAM:every+policy", lambda: SAM(params(), SGD, every=2, policy=AdaptivePolicy(), lr=0.1), ValueError,
        r"SAM: give either every=2 or a policy, not both"),
    bad("GSAM:empty-filter", lambda: GSAM(params(), SGD, perturb_filter=lambda p: False, lr=0.1), ValueError,
        r"GSAM: perturb_filter selects none of the 2 parameters"),
    bad("SAM:filter-not-callable", lambda: SAM(params(), SGD, perturb_filter="norm", lr=0.1), TypeError,
        r"SAM: perturb_filter must be"),
    bad("RSAM:every=2", lambda: RSAM(params(), SGD, every=2, lr=0.1), ValueError, r"RSAM runs its own step logic"),
    bad("norm_layer_filter:no-norm", lambda: norm_layer_filter(model()), ValueError,
        r"norm_layer_filter: model has no normalisation layer with parameters"),
    bad("AdaptivePolicy:delta=1", lambda: AdaptivePolicy(delta=1.0), ValueError, r"AdaptivePolicy: delta must be in"),
    bad("AdaptivePolicy:total_steps=0", lambda: AdaptivePolicy(total_steps=0), ValueError,
        r"AdaptivePolicy: total_steps must be"),
    bad("MSAM:rho=-1", lambda: MSAM(params(), rho=-1.0), ValueError, r"MSAM: rho must be a finite number >= 0, got -1"),
    bad("MSAM:momentum=1", lambda: MSAM(params(), momentum=1.0), ValueError, r"MSAM: momentum must be in"),
    bad("MSAM:lr=nan", lambda: MSAM(params(), lr=math.nan), ValueError, r"MSAM: lr must be a finite number"),
    bad("MSAMAdamW:betas", lambda: MSAMAdamW(params(), betas=(0.9, 1.0)), ValueError,
        r"MSAMAdamW: betas\[1\] must be in"),
    bad("MSAMAdamW:betas-scalar", lambda: MSAMAdamW(params(), betas=0.9), ValueError,
        r"MSAMAdamW: betas must be a pair"),
    bad("msam_sgd_:rho=-1", lambda: O.msam_sgd_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], torch.zeros(()),
                                                lr=0.1, rho_prev=0.0, rho=-1.0), ValueError,
        r"msam_sgd_: rho\[0\] must be >= 0, got -1"),
    bad("msam_sgd_:inv_norm-list", lambda: O.msam_sgd_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], [0.0],
                                                       lr=0.1, rho_prev=0.0, rho=0.1), TypeError,
        r"msam_sgd_: inv_norm must be a tensor or None"),
    bad("msam_adamw_:shape", lambda: O.msam_adamw_([torch.ones(2)], [torch.ones(3)], [torch.ones(2)], [torch.ones(2)],
                                                   [torch.ones(())], torch.zeros(()), lr=0.1, rho_prev=0.0, rho=0.1),
        ValueError, r"msam_adamw_: grads\[0\] has shape \[3\] but params\[0\] has shape \[2\]"),
]

def flt(target=None, **kw):
    """fused_linear_trajectory_loss on 4 rows, H 3, V 5, a teacher target unless another is given."""
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), labels=y())
    if target is None:
        args.update(target_hidden=torch.randn(4, 3), target_weight=torch.randn(5, 3))
    return sk.fused_linear_trajectory_loss(**{**args, **(target or {}), **kw})


def topk(k=2, **kw):
    z5 = torch.randn(4, 5)
    v, i = z5.topk(k, -1)
    return {"target_topk": (kw.get("idx", i), kw.get("logit", v), kw.get("lse", z5.logsumexp(-1)))
            + ((kw["valid"],) if "valid" in kw else ())}


FUSED_LINEAR = [
    bad("fused_linear:hidden-list", lambda: flt(hidden=[[1.0]]),
        TypeError, r"hidden must be a torch\.Tensor, got list"),
    bad("fused_linear:hidden-int", lambda: flt(hidden=torch.ones(4, 3, dtype=torch.int64)), TypeError,
        r"hidden must be float32, float16, bfloat16 or float64, got torch\.int64"),
    bad("fused_linear:hidden-1d", lambda: flt(hidden=torch.randn(3)), ValueError,
        r"hidden must be \[\.\.\., H\] with at least 2 dims, got shape \(3,\)"),
    bad("fused_linear:weight-H", lambda: flt(weight=torch.randn(5, 4)), ValueError,
        r"weight must be \[V, 3\] for hidden \(4, 3\), got \(5, 4\)"),
    bad("fused_linear:weight-dtype", lambda: flt(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError,
        r"weight dtype torch\.float64 differs from hidden dtype torch\.float32"),
    bad("fused_linear:bias-shape", lambda: flt(bias=torch.randn(4)), ValueError,
        r"bias must be \[5\] in torch\.float32, got \(4,\)"),
    bad("fused_linear:labels-float", lambda: flt(labels=torch.zeros(4)), ValueError,
        r"labels must be int64 or int32 class indices of shape \[4\], got \(4,\) torch\.float32"),
    bad("fused_linear:labels-shape", lambda: flt(labels=y(3)),
        ValueError, r"labels must be .* of shape \[4\], got \(3,\)"),
    bad("fused_linear:no-target", lambda: flt(target={}, target_hidden=None, target_weight=None), ValueError,
        r"give exactly one target: .*got none"),
    bad("fused_linear:two-targets", lambda: flt(target_logits=z(4, 5)), ValueError,
        r"give exactly one target: .*got \['target_hidden/target_weight', 'target_logits'\]"),
    bad("fused_linear:target_weight-alone", lambda: flt(target={"target_weight": torch.randn(5, 3)}), ValueError,
        r"target_hidden and target_weight go together; got only target_weight"),
    bad("fused_linear:target_bias-without-hidden", lambda: flt(target={"target_logits": z(4, 5)},
                                                               target_bias=torch.randn(5)), ValueError,
        r"target_bias goes with target_hidden"),
    bad("fused_linear:target_weight-V", lambda: flt(target_weight=torch.randn(6, 3)), ValueError,
        r"target_hidden must be \[\*\[4\], H'\] and target_weight \[5, H'\], got \(4, 3\) and \(6, 3\)"),
    bad("fused_linear:target_logits-shape", lambda: flt(target={"target_logits": z(4, 6)}), ValueError,
        r"target_logits must be \[4, 5\], got \(4, 6\)"),
    bad("fused_linear:topk-not-tuple", lambda: flt(target={"target_topk": torch.zeros(4, 2)}), TypeError,
        r"target_topk must be a tuple \(idx, logit, lse\) or \(idx, logit, lse, valid\), got Tensor"),
    bad("fused_linear:topk-idx-int32", lambda: flt(target=topk(idx=torch.zeros(4, 2, dtype=torch.int32))),
        TypeError, r"target_topk idx must be int64, got torch\.int32"),
    bad("fused_linear:topk-k", lambda: flt(target=topk(idx=torch.zeros(4, 6, dtype=torch.int64),
                                                        logit=torch.zeros(4, 6))), ValueError,
        r"target_topk must keep k in \[1, 5\] classes per row, got k=6"),
    bad("fused_linear:topk-lse-shape", lambda: flt(target=topk(lse=torch.zeros(4, 1))), ValueError,
        r"target_topk lse must be \[4\], got \(4, 1\)"),
    bad("fused_linear:topk-valid-float", lambda: flt(target=topk(valid=torch.ones(4))), ValueError,
        r"target_topk valid must be a bool tensor of shape \[4\]"),
    bad("fused_linear:lam=nan", lambda: flt(lam=math.nan), ValueError, r"lam must be a finite number, got nan"),
    bad("fused_linear:temperature=0", lambda: flt(temperature=0),
        ValueError, r"temperature must be a finite number > 0, got 0"),
    bad("fused_linear:label_smoothing=-0.1", lambda: flt(label_smoothing=-0.1), ValueError,
        r"label_smoothing must be in \[0\.0, 1\.0\], got -0\.1"),
    bad("fused_linear:ignore_index=1.5", lambda: flt(ignore_index=1.5),
        TypeError, r"ignore_index must be an int, got 1\.5"),
    bad("fused_linear:chunk_size=0", lambda: flt(chunk_size=0), ValueError, r"chunk_size must be an int >= 1, got 0"),
    bad("fused_linear:chunk_size=2.5", lambda: flt(chunk_size=2.5),
        ValueError, r"chunk_size must be an int >= 1, got 2\.5"),
    bad("fused_linear:backend", lambda: flt(backend="gpu"), ValueError, r"unknown backend 'gpu'"),
    bad("TopKTrajectoryBank:k=0", lambda: sk.TopKTrajectoryBank(10, k=0), ValueError, r"k must be an int >= 1, got 0"),
    bad("TopKTrajectoryBank:tokens=1.5", lambda: sk.TopKTrajectoryBank(10, tokens=1.5), ValueError,
        r"tokens must be an int >= 1, got 1\.5"),
    bad("TopKTrajectoryBank:dtype", lambda: sk.TopKTrajectoryBank(10, dtype=torch.int8), TypeError,
        r"dtype must be torch\.bfloat16, torch\.float16 or torch\.float32, got torch\.int8"),
    bad("TopKTrajectoryBank:record-ids-float", lambda: sk.TopKTrajectoryBank(10, k=2).record(torch.zeros(4), z(), 0),
        TypeError, r"sample_ids must be a 1-D int64 or int32 tensor, got \(torch\.float32, \(4,\)\)"),
    bad("TopKTrajectoryBank:record-V<k", lambda: sk.TopKTrajectoryBank(10, k=8).record(y(), z(), 0), ValueError,
        r"logits must be a float tensor \[4, V\] with V >= k=8, got \(4, 5\)"),
    bad("TopKTrajectoryBank:lookup-epoch", lambda: sk.TopKTrajectoryBank(10, k=2).lookup(y(), -1), ValueError,
        r"epoch must be an int >= 0, got -1"),
]

ROWS = (LOSSES + FUSED_LINEAR + BANK + EMA + SAM_OPS + RANDOM_OPS + BANK_OPS + OPTIMIZERS + SHARPNESS + BENCH
        + CHEAP + PHYSICAL
        + INTEGRATIONS)


@pytest.mark.parametrize(("call", "exc", "match"), ROWS)
def test_bad_argument_is_rejected(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_table_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
