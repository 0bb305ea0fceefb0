"""LightningModule: trains the survival MLP on censored accepted lengths.

Objective. For a step whose draft would have ``L`` of its tokens accepted, the network
predicts continuation probabilities ``σ(z_k) = P(L >= k | L >= k-1, x)``; the survival curve
is ``s_k = prod_{j<=k} σ(z_j)``. The likelihood of an observation ``(l, cap)`` is

    l < cap:  s_l * (1 - σ(z_{l+1}))        (exactly l accepted)
    l == cap: s_cap                         (at least cap accepted: censored)

so trace rows (cap = γmax or the tokens left), live rows (cap = γ drafted) and the seed
paper's rows (cap = its γ) all train the same model. From the survival curve,
``E[tokens | γ] = 1 + sum_{k<=γ} s_k``, and the policy picks the γ with the most expected
tokens per second under the measured cost of each γ (``objective="tokens_per_s"``), or the
seed paper's tokens per step (``objective="tokens_per_step"``, kept for comparison).

Two networks learn the same outcome from what each decision knows: the *pre-draft* one from
the history before the draft runs (:data:`speckv.runtime.features.PRE_FEATURE_NAMES`), the
*step* one after the draft's first proposal. The loss is the sum of their likelihoods. The
policy value logged in validation runs both decisions on every row: "no speculation" is a
candidate with E[tokens] = 1 at the plain step's cost, taken when no γ's
``E_pre[γ] / cost(γ)`` beats it; otherwise the step network's γ, scored by the row's measured
outcome and costs (the catch-up the row's pre-draft vector assumes included).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import lightning as L
import numpy as np
import torch
import torchmetrics as tm
from torch.nn import functional as F

from speckv.errors import SpeckvError
from speckv.runtime.features import COMPRESSIONS, MAX_SKIP_RUN, PRE_FEATURE_NAMES
from speckv.train.checkpoint import restore_rng_states, resume_mismatches, rng_states
from speckv.train.network import SurvivalMLP, expected_tokens, speculate_rule

log = logging.getLogger(__name__)


class ResumeError(SpeckvError):
    """A checkpoint ``fit`` was asked to resume from was trained with other settings."""


def survival_nll(z: torch.Tensor, accept_len: torch.Tensor, accept_cap: torch.Tensor):
    """Mean negative log-likelihood of censored accepted lengths (rows with cap 0 ignored)."""
    log_s = torch.cumsum(F.logsigmoid(z), -1)  # [B, K]: log s_1..s_K
    log_s0 = F.pad(log_s, (1, 0))  # log s_0 = 0 at index 0
    ll = log_s0.gather(1, accept_len[:, None])[:, 0]
    exact = accept_len < accept_cap
    stop = F.logsigmoid(-z).gather(1, accept_len.clamp(max=z.shape[1] - 1)[:, None])[:, 0]
    ll = ll + torch.where(exact, stop, torch.zeros_like(stop))
    informative = accept_cap > 0
    return -(ll[informative]).sum() / informative.sum().clamp_min(1)


class SpeckvModule(L.LightningModule):
    """Survival MLP + expected-tokens objective, with calibration and policy-value metrics."""

    def __init__(
        self,
        n_features: int,
        gammas: list[int],
        feature_names: list[str],
        hidden: list[int] = (32, 32),
        dropout: float = 0.0,
        activation: Literal["relu", "gelu"] = "relu",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        objective: Literal["tokens_per_s", "tokens_per_step"] = "tokens_per_s",
        pre_feature_names: list[str] | None = None,
    ) -> None:
        """
        Args:
            n_features: length of the feature vector (linked from the data).
            gammas: candidate speculation lengths (linked from the data).
            feature_names: names of the features, in order (linked from the data).
            hidden: widths of the MLP's hidden layers.
            dropout: dropout after each hidden layer.
            activation: the hidden layers' activation; ReLU fuses into the Gemm before it in
                onnxruntime (one node fewer per layer at decision time).
            lr: AdamW learning rate (cosine-annealed over the run).
            weight_decay: AdamW weight decay.
            objective: what the policy maximises: measured tokens per second, or the seed
                paper's tokens per step.
            pre_feature_names: names of the pre-draft features, in order (default: speckv's,
                which every feature set of the DataModule builds).
        """
        super().__init__()
        self.save_hyperparameters()
        self.gammas = list(gammas)
        self.pre_feature_names = list(pre_feature_names or PRE_FEATURE_NAMES)
        self.mlp = SurvivalMLP(n_features, max(self.gammas), list(hidden), dropout, activation)
        self.pre_mlp = SurvivalMLP(len(self.pre_feature_names), max(self.gammas), list(hidden),
                                   dropout, activation)
        self.metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({
                "auroc_s1": tm.classification.BinaryAUROC(),
                "brier_s1": tm.MeanSquaredError(),
                "mae_tokens": tm.MeanAbsoluteError(),
                "corr_acceptance": tm.PearsonCorrCoef(),
            })
            for stage in ("train_", "val_", "test_")  # ModuleDict keys may not be "train"
        })
        self._policy: dict[str, list] = {}
        self._calib: list[tuple[np.ndarray, np.ndarray]] = []

    # ----------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is not None and stage == "fit" and dm.mean is not None:
            self.mlp.set_scaling(torch.from_numpy(dm.mean), torch.from_numpy(dm.std))
            if getattr(dm, "pre_mean", None) is not None:
                self.pre_mlp.set_scaling(torch.from_numpy(dm.pre_mean),
                                         torch.from_numpy(dm.pre_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.survival(x)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        steps = self.trainer.estimated_stepping_batches if self._trainer else 1000
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------- steps
    def _unpack(self, batch):
        dm = self.trainer.datamodule
        return dm.batch_dict(batch) if isinstance(batch, (list, tuple)) else batch

    def _common_step(self, batch, stage: str) -> torch.Tensor:
        b = self._unpack(batch)
        z = self.mlp(b["x"])
        z_pre = self.pre_mlp(b["x_pre"])
        loss_step = survival_nll(z, b["accept_len"], b["accept_cap"])
        loss_pre = survival_nll(z_pre, b["accept_len"], b["accept_cap"])
        loss = loss_step + loss_pre
        log = {"on_epoch": True, "on_step": False, "batch_size": len(z)}
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", **log)
        self.log(f"{stage}/loss_step", loss_step, **log)
        self.log(f"{stage}/loss_pre", loss_pre, **log)
        with torch.no_grad():
            self._update_metrics(z, z_pre, b, stage)
        return loss

    def _update_metrics(self, z, z_pre, b, stage: str) -> None:
        surv = torch.exp(torch.cumsum(F.logsigmoid(z), -1))
        m = self.metrics[f"{stage}_"]
        informative = b["accept_cap"] > 0
        if informative.any():
            hit = (b["accept_len"][informative] >= 1).long()
            m["auroc_s1"].update(surv[informative, 0], hit)
            m["brier_s1"].update(surv[informative, 0], hit.float())
        # acceptance rate at the reference γ, where the observation pins it down
        g = b["ref_gamma"]
        known = (g <= b["accept_cap"]) | (b["accept_len"] < b["accept_cap"])
        if known.sum() > 1:
            csum = torch.cumsum(surv, -1).gather(1, (g - 1)[:, None])[:, 0]
            actual = torch.minimum(b["accept_len"], g).float()
            m["mae_tokens"].update(1 + csum[known], 1 + actual[known])
            m["corr_acceptance"].update(csum[known] / g[known], actual[known] / g[known])
        if stage != "train" and b["has_cost"].any():
            sel = b["has_cost"]
            per_step = self.hparams.objective == "tokens_per_step"
            costs = b["costs"][sel]
            plain = b["plain_cost"][sel][:, None]
            if per_step:
                costs, plain = torch.ones_like(costs), torch.ones_like(plain)
            expected = expected_tokens(surv[sel], self.gammas)
            pre_surv = torch.exp(torch.cumsum(F.logsigmoid(z_pre[sel]), -1))
            speculate = speculate_rule(expected_tokens(pre_surv, self.gammas), costs, plain)
            idx = (expected / costs).argmax(-1)
            gam = torch.as_tensor(self.gammas, device=z.device)
            # columns: a plain step (1 token), then each γ (min(L, γ) + 1 tokens)
            acc = torch.cat([torch.ones_like(plain),
                             torch.minimum(b["accept_len"][sel][:, None], gam[None, :]) + 1.0],
                            1)
            all_costs = torch.cat([plain, costs], 1)
            choice = torch.where(speculate, idx + 1, torch.zeros_like(idx))
            self._policy.setdefault(stage, []).append(
                (acc.gather(1, choice[:, None])[:, 0], all_costs.gather(1, choice[:, None])[:, 0],
                 acc, all_costs, b["compression"][sel], gam[idx], speculate))
        if stage == "val":
            self._calib.append((surv[informative, 0].cpu().numpy(),
                                (b["accept_len"][informative] >= 1).cpu().numpy()))

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        b = self._unpack(batch)
        surv = self.mlp.survival(b["x"])
        expected = expected_tokens(surv, self.gammas)
        costs, plain = b["costs"], b["plain_cost"][:, None]
        if self.hparams.objective == "tokens_per_step":
            costs, plain = torch.ones_like(costs), torch.ones_like(plain)
        pre_expected = expected_tokens(self.pre_mlp.survival(b["x_pre"]), self.gammas)
        gam = torch.as_tensor(self.gammas)
        return {"survival": surv, "expected_tokens": expected,
                "gamma": gam[(expected / costs).argmax(-1)],
                "pre_expected_tokens": pre_expected,
                "speculate": speculate_rule(pre_expected, costs, plain)}

    # ------------------------------------------------------------------------- epoch ends
    def _end_epoch(self, stage: str) -> None:
        for name, metric in self.metrics[f"{stage}_"].items():
            if metric.update_called:
                # a metric can be undefined on a tiny split (e.g. AUROC with one class)
                with contextlib.suppress(ValueError, RuntimeError):
                    self.log(f"{stage}/{name}", metric.compute(), on_epoch=True)
            metric.reset()
        rows = self._policy.pop(stage, [])
        if rows:
            parts = (torch.cat(c) for c in zip(*rows, strict=True))
            chosen_acc, chosen_cost, acc, costs, comp, gam, speculate = parts
            tps_policy = chosen_acc.sum() / chosen_cost.sum()
            # the best single choice on these rows, per compression level, among fixed γ
            # (columns 1..) and also plain decoding (column 0): optimistic baselines, chosen
            # on the evaluation rows themselves
            baselines = {}
            for name, first in (("fixed", 1), ("static", 0)):
                best_acc = best_cost = torch.zeros((), dtype=acc.dtype)
                for c in comp.unique():
                    sel = comp == c
                    per_s = acc[sel, first:].sum(0) / costs[sel, first:].sum(0)
                    col = first + (acc[sel, first:].sum(0).argmax()
                                   if self.hparams.objective == "tokens_per_step"
                                   else per_s.argmax())
                    best_acc = best_acc + acc[sel, col].sum()
                    best_cost = best_cost + costs[sel, col].sum()
                baselines[name] = best_acc / best_cost
            self.log(f"{stage}/tokens_per_step", chosen_acc.mean())
            self.log(f"{stage}/tokens_per_s", tps_policy)
            self.log(f"{stage}/best_fixed_tokens_per_s", baselines["fixed"])
            self.log(f"{stage}/best_static_tokens_per_s", baselines["static"])
            self.log(f"{stage}/gain_over_best_fixed", tps_policy / baselines["fixed"])
            self.log(f"{stage}/gain_over_best_static", tps_policy / baselines["static"])
            self.log(f"{stage}/mean_gamma", gam[speculate].float().mean() if speculate.any()
                     else torch.zeros(()))
            self.log(f"{stage}/skip_rate", 1.0 - speculate.float().mean())
            for i, c in enumerate(COMPRESSIONS):
                sel = comp == i
                if sel.any():
                    self.log(f"{stage}/tokens_per_s_{c}",
                             chosen_acc[sel].sum() / chosen_cost[sel].sum())
                    self.log(f"{stage}/skip_rate_{c}", 1.0 - speculate[sel].float().mean())

    def on_train_epoch_end(self) -> None:
        self._end_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")
        if self._calib and not self.trainer.sanity_checking:
            self._log_calibration_figure()
        self._calib = []

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def _log_calibration_figure(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pred = np.concatenate([p for p, _ in self._calib])
        hit = np.concatenate([h for _, h in self._calib]).astype(float)
        bins = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(pred, bins) - 1, 0, 9)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        xs = [pred[idx == i].mean() for i in range(10) if (idx == i).any()]
        ys = [hit[idx == i].mean() for i in range(10) if (idx == i).any()]
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("predicted P(first draft token accepted)")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"calibration, epoch {self.current_epoch}")
        fig.tight_layout()
        logger = self.logger
        if logger is not None and hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure("val/calibration", fig, self.current_epoch)
        plt.close(fig)

    # ------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        config = {"gamma_max": max(self.gammas), "hidden": list(self.hparams.hidden),
                  "dropout": self.hparams.dropout, "activation": self.hparams.activation}
        meta = {
            "mlp_config": {"n_features": self.hparams.n_features, **config},
            "pre_mlp_config": {"n_features": len(self.pre_feature_names), **config},
            "feature_names": list(self.hparams.feature_names),
            "pre_feature_names": list(self.pre_feature_names),
            "max_skip_run": int(getattr(dm, "max_skip_run", MAX_SKIP_RUN)),
            "gammas": self.gammas,
            "compressions": list(COMPRESSIONS),
            "objective": self.hparams.objective,
            "feature_set": getattr(dm, "feature_set", "decision"),
            "data_fingerprint": getattr(dm, "fingerprint", "unknown"),
        }
        if dm is not None and dm.parity_rows is not None:
            # tensors, not numpy arrays: Lightning reloads checkpoints with weights_only=True
            keys = ("parity_features", "parity_pre_features", "parity_costs",
                    "parity_plain_costs")
            for key, array in zip(keys, dm.parity_rows, strict=True):
                meta[key] = torch.from_numpy(np.ascontiguousarray(array))
        checkpoint["speckv"] = meta
        # the next epoch's data order (and any dropout) draws from these: a resumed run
        # that puts them back continues exactly as the uninterrupted run would
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming ``fit`` (``--ckpt_path``): refuse a checkpoint trained with other settings
        or records, and put back the random state it was saved with."""
        if not (self._trainer and self.trainer.state.fn == "fit"):
            return
        dm = getattr(self.trainer, "datamodule", None)
        differ = resume_mismatches(checkpoint, dict(self.hparams),
                                   dict(dm.hparams) if dm is not None else None,
                                   getattr(dm, "fingerprint", None))
        if differ:
            raise ResumeError(
                f"The checkpoint {self.trainer.ckpt_path} was trained with other settings "
                f"({'; '.join(differ)}). Resuming would mix two trainings: resume with the "
                "settings it was made with (its run's config.yaml holds them), or leave out "
                "--ckpt_path to train anew.")
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("%s holds no random state (saved by an older speckv): the resumed run "
                        "will shuffle its data differently from an uninterrupted one",
                        self.trainer.ckpt_path)
        else:
            restore_rng_states(states)
