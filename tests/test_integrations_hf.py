"""Hugging Face Transformers: SharpnessAwareTrainer on tiny randomly initialised models built from
configs (nothing downloaded) equals the plain loop, with gradient accumulation, clipping, bf16
and a GradScaler through Accelerate, checkpoint save / resume, optimizers built from
TrainingArguments, and the MESA option."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Transformers is not installed (pip install transformers "
                                                          "accelerate; make test installs it)")
pytest.importorskip("accelerate", reason="Accelerate is not installed (pip install accelerate; make test installs it)")

from torch.utils.data import Dataset, SequentialSampler  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import saf_kernels as sk  # noqa: E402
from saf_kernels.integrations.hf import SAM_METHODS, SharpnessAwareTrainer  # noqa: E402

from .integrations_common import OPTIMIZERS, assert_differ, assert_same_state, reference_loop  # noqa: E402

B, L, V = 4, 6, 40

warnings.filterwarnings("ignore", message=".*`use_cpu`.*")


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


class Seqs(Dataset):
    def __init__(self, n, lm=False, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, L), generator=g)
        self.labels = self.ids.clone() if lm else torch.randint(0, 3, (n,), generator=g)
        if lm:
            self.labels[:, :2] = -100  # a prompt: not scored

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}

    def micro_batches(self):
        return [{"input_ids": self.ids[s : s + B], "labels": self.labels[s : s + B]} for s in range(0, len(self), B)]


class InOrder(SharpnessAwareTrainer):
    """The data in order (so that the plain loop sees the same micro-batches), and every loss a
    micro-batch mean divided by the accumulation steps (the plain loop's scaling)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _args(tmp_path, k=1, steps=3, **kw):
    kw.setdefault("max_grad_norm", 0.0)
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B, gradient_accumulation_steps=k,
                             max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                             save_strategy=kw.pop("save_strategy", "no"), logging_strategy="no", use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)


def _hf_loss(net, mb):
    return net(**mb).loss


@pytest.mark.parametrize("name", ["sam", "esam", "rsam", "gsam"])
def test_given_optimizer_equals_the_plain_loop(name, tmp_path):
    """optimizers=(opt, None), 3 steps of 2 micro-batches, the second gradients clipped."""
    k, steps, clip = 2, 3, 0.3
    data = Seqs(k * steps * B)
    model = bert()
    InOrder(model=model, args=_args(tmp_path, k, steps, max_grad_norm=clip), train_dataset=data,
            optimizers=(OPTIMIZERS[name](model.parameters()), None)).train()
    ref = bert()
    reference_loop(ref, OPTIMIZERS[name](ref.parameters()), data.micro_batches(), k, clip=clip, loss_of=_hf_loss)
    assert_same_state(model, ref, rtol=1e-5, atol=1e-6, what=name)
    unclipped = bert()
    reference_loop(unclipped, OPTIMIZERS[name](unclipped.parameters()), data.micro_batches(), k, loss_of=_hf_loss)
    assert_differ(model, unclipped)


def test_rho_zero_is_the_stock_trainer(tmp_path):
    """SAM with rho = 0 is exactly its base optimizer: the two-pass machinery adds nothing else
    (on the bit-exact path, fused_step=False; the default fused step equals it to rounding)."""
    data = Seqs(2 * 2 * B)
    a, b = bert(), bert()
    SharpnessAwareTrainer(model=a, args=_args(tmp_path / "a", 2, 2), train_dataset=data, sam="sam", sam_rho=0.0,
                          sam_kwargs={"fused_step": False}).train()
    Trainer(model=b, args=_args(tmp_path / "b", 2, 2), train_dataset=data).train()
    assert_same_state(a, b, rtol=0, atol=0)


def test_built_from_training_arguments(tmp_path):
    """sam="asam", sam_rho: ASAM around the class args.optim names (AdamW), with the Trainer's
    groups (no weight decay on biases and LayerNorm), equal to the same optimizer built by hand."""
    data = Seqs(2 * B)
    model = bert()
    t = InOrder(model=model, args=_args(tmp_path, 1, 2, weight_decay=0.1), train_dataset=data, sam="asam", sam_rho=0.3)
    t.train()
    opt = t.optimizer.optimizer
    assert type(opt) is sk.optim.ASAM and type(opt.base_optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["rho"] == 0.3 and g["lr"] == 1e-2 for g in opt.param_groups)
    ref = bert()
    decay = set(t.get_decay_parameter_names(ref))
    groups = [{"params": [p for n, p in ref.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in ref.named_parameters() if n not in decay], "weight_decay": 0.0}]
    ref_opt = sk.optim.ASAM(groups, torch.optim.AdamW, rho=0.3, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    reference_loop(ref, ref_opt, data.micro_batches(), 1, loss_of=_hf_loss)
    assert_same_state(model, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAM_METHODS))
def test_every_method_by_name(name, tmp_path):
    t = SharpnessAwareTrainer(model=bert(), args=_args(tmp_path), train_dataset=Seqs(B), sam=name)
    opt = t.create_optimizer()
    assert type(opt) is SAM_METHODS[name]
    if name == "esam":
        assert opt.gamma == 1.0


def test_bad_arguments(tmp_path):
    model = bert()
    with pytest.raises(ValueError, match="sam must be one of"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), train_dataset=Seqs(B), sam="lookahead")
    with pytest.raises(ValueError, match="leave them unset"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), train_dataset=Seqs(B), sam_rho=0.1,
                              optimizers=(OPTIMIZERS["sam"](model.parameters()), None))
    with pytest.raises(ValueError, match="gamma=1"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), train_dataset=Seqs(B), optimizers=(
            sk.optim.ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1), None))
    with pytest.raises(TypeError, match="saf_kernels.MESA"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), train_dataset=Seqs(B), mesa=object())


def test_bf16_through_accelerate(tmp_path):
    data = Seqs(2 * 2 * B)
    model = bert()
    InOrder(model=model, args=_args(tmp_path, 2, 2, bf16=True), train_dataset=data,
            optimizers=(OPTIMIZERS["sam"](model.parameters()), None)).train()
    ref = bert()
    reference_loop(ref, OPTIMIZERS["sam"](ref.parameters()), data.micro_batches(), 2, autocast=torch.bfloat16,
                   loss_of=_hf_loss)
    assert_same_state(model, ref, rtol=1e-5, atol=1e-6)


def test_grad_scaler_through_accelerate(tmp_path):
    """fp16: Accelerate makes a GradScaler only on a GPU; here one is given to the Accelerator by
    hand (float16 autocast on the CPU), so that its scale / unscale-for-clipping / step / update
    path runs: equal to the plain loop with the same scaler."""
    data = Seqs(2 * 2 * B)
    model = bert()
    t = InOrder(model=model, args=_args(tmp_path, 2, 2, fp16=True, max_grad_norm=0.5), train_dataset=data,
                optimizers=(OPTIMIZERS["rsam"](model.parameters()), None))
    t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    t.accelerator.native_amp = True
    t.train()
    ref = bert()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference_loop(ref, OPTIMIZERS["rsam"](ref.parameters()), data.micro_batches(), 2, clip=0.5, scaler=scaler,
                   autocast=torch.float16, loss_of=_hf_loss)
    assert_same_state(model, ref, rtol=1e-4, atol=1e-5)
    assert t.accelerator.scaler.get_scale() == scaler.get_scale()


def test_checkpoint_resume(tmp_path):
    """R-SAM (its noise seed and step) with SGD momentum: 4 steps in one run equal 2 steps, a
    checkpoint, and 2 more steps in a new trainer resumed from it."""
    data = Seqs(4 * 2 * B)

    def run(out, resume=None):
        model = bert()
        args = _args(out, 2, 4, save_strategy="steps", save_steps=2)
        InOrder(model=model, args=args, train_dataset=data, optimizers=(OPTIMIZERS["rsam"](model.parameters()), None)
                ).train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_state(resumed, full, rtol=0, atol=0)


def test_mesa_on_a_causal_lm_with_resume(tmp_path):
    """MESA with a plain AdamW: the fused loss on the shifted tokens (prompt labels -100 ignored)
    against the EMA teacher, the EMA after each optimizer step (2 micro-batches each), equal to
    the plain loop; the teacher comes back from a checkpoint."""
    k, steps = 2, 4
    data = Seqs(k * steps * B, lm=True)

    def make(out, resume=None, save=False):
        model = gpt2()
        mesa = sk.MESA(model, lam=0.5, temperature=2.0, decay=0.5, start_epoch=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        args = _args(out, k, steps, save_strategy="steps" if save else "no", save_steps=2)
        InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, None), mesa=mesa).train(
            resume_from_checkpoint=resume)
        return model, mesa

    model, mesa = make(tmp_path / "full", save=True)
    ref = gpt2()
    ref_mesa = sk.MESA(ref, lam=0.5, temperature=2.0, decay=0.5, start_epoch=0)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    mbs = data.micro_batches()
    for s in range(0, len(mbs), k):
        for mb in mbs[s : s + k]:
            logits = ref(input_ids=mb["input_ids"]).logits[:, :-1]
            with torch.no_grad():
                teacher = ref_mesa.teacher(input_ids=mb["input_ids"]).logits[:, :-1]
            loss = ref_mesa(logits.reshape(-1, V), mb["labels"][:, 1:].reshape(-1), None, 0,
                            teacher_logits=teacher.reshape(-1, V))
            (loss / k).backward()
        opt.step()
        opt.zero_grad()
        ref_mesa.update()
    assert_same_state(model, ref, rtol=1e-5, atol=1e-6)
    assert_same_state(mesa.teacher, ref_mesa.teacher, rtol=1e-5, atol=1e-6, what="teacher")
    resumed, resumed_mesa = make(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_state(resumed, model, rtol=0, atol=0)
    assert_same_state(resumed_mesa.teacher, mesa.teacher, rtol=0, atol=0, what="teacher")
