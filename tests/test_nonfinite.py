"""A NaN or infinite training loss is never trained on: the run stops or skips the step, naming the batch's rows."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import TINY_PIXELS
from vdr.data.datamodule import RerankDataModule, RetrievalDataModule
from vdr.lit.base import BackboneConfig
from vdr.lit.biencoder import BiEncoderModule
from vdr.lit.reranker import RerankerModule
from vdr.losses.contrastive import InfoNCELoss
from vdr.losses.ranking import ListwiseCE

POISONED_STEP = 1  # the second batch's loss is made NaN (or inf)


class PoisonedInfoNCE(InfoNCELoss):
    """InfoNCE whose value is ``poison`` (NaN or inf) while ``active``."""

    poison, active = float("nan"), False

    def forward(self, *args, **kwargs):
        loss = super().forward(*args, **kwargs)
        return loss + self.poison if self.active else loss


class PoisonedListwise(ListwiseCE):
    poison, active = float("nan"), False

    def forward(self, *args, **kwargs):
        loss = super().forward(*args, **kwargs)
        return loss + self.poison if self.active else loss


class Watch(L.Callback):
    """Poisons the loss at ``POISONED_STEP``; records each batch's rows and whether its step changed the weights."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.changed: list[bool] = []

    def _weights(self, module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad]).clone()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.loss.active = trainer.global_step == POISONED_STEP
        self.before = self._weights(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append(batch.rows.tolist())
        self.changed.append(not torch.equal(self._weights(module), self.before))


def fit(module, data, steps: int = 4) -> Watch:
    watch = Watch()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[watch],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == steps  # a skipped step still counts: the schedule does not shift
    return watch


def biencoder(poison: float, **kwargs) -> BiEncoderModule:
    loss = PoisonedInfoNCE(learnable_temperature=True)
    loss.poison = poison
    return BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), loss=loss,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kwargs)


@pytest.mark.parametrize("mini_batch_size", [None, 3], ids=["plain", "gradcache"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_skip_leaves_the_weights_and_names_the_rows(tiny_synth: Path, mini_batch_size: int | None,
                                                    poison: float) -> None:
    module = biencoder(poison, nonfinite_loss="skip", mini_batch_size=mini_batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = fit(module, RetrievalDataModule(train=str(tiny_synth / "train"), batch_size=8))
    assert watch.changed == [True, False, True, True]  # only the poisoned step left the weights alone
    assert all(torch.isfinite(p).all() for p in module.parameters())
    messages = [str(w.message) for w in caught if "nonfinite_loss: skip" in str(w.message)]
    assert len(messages) == 1
    assert f"training rows {watch.rows[POISONED_STEP]}" in messages[0] and "train" in messages[0]
    assert module._skipped_steps == 1


def test_stop_raises_naming_the_rows(tiny_synth: Path) -> None:
    module = biencoder(float("nan"))  # nonfinite_loss: stop is the default
    watch = Watch()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[watch],
                        limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(FloatingPointError, match=r"step 1: the loss is nan on training rows \[") as raised:
        trainer.fit(module, datamodule=RetrievalDataModule(train=str(tiny_synth / "train"), batch_size=8))
    assert "nonfinite_loss" in str(raised.value)
    assert watch.changed == [True]  # the poisoned step never reached the optimizer
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_reranker_skips_too(tiny_synth: Path) -> None:
    loss = PoisonedListwise()
    module = RerankerModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), loss=loss, nonfinite_loss="skip",
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = fit(module, RerankDataModule(train=str(tiny_synth / "train"), batch_size=4))
    assert watch.changed == [True, False, True, True]
    assert any(f"training rows {watch.rows[POISONED_STEP]}" in str(w.message) for w in caught)


def test_nonfinite_loss_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="nonfinite_loss must be 'stop' or 'skip'"):
        BiEncoderModule(BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS), nonfinite_loss="ignore")


class PoisonGradient(Watch):
    """A finite loss whose gradients are NaN at ``POISONED_STEP`` (a hook on the temperature's gradient)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = self._weights(module)
        self.hook = None
        if trainer.global_step == POISONED_STEP:
            self.hook = module.loss.log_scale.register_hook(lambda grad: grad * float("nan"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.hook is not None:
            self.hook.remove()
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_gradients_of_a_finite_loss_are_never_applied(tiny_synth: Path, mode: str) -> None:
    module = biencoder(0.0, nonfinite_loss=mode)
    watch = PoisonGradient()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[watch],
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    data = RetrievalDataModule(train=str(tiny_synth / "train"), batch_size=8)
    if mode == "stop":
        with pytest.raises(FloatingPointError, match=r"step 1: the loss is finite but its gradients are not .*rows \["):
            trainer.fit(module, datamodule=data)
    else:
        with pytest.warns(UserWarning, match=r"gradients are not .* the step is skipped"):
            trainer.fit(module, datamodule=data)
        assert watch.changed == [True, False, True, True]  # clipping did not spread the NaN: nothing moved
    assert all(torch.isfinite(p).all() for p in module.parameters())
