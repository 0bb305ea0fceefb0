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
*step* one after the draft's first proposal. A third, the *lookup* network, learns the
accepted length of the context lookup's continuation where it proposes one (censored at its
length and the tokens left), from the proposal's signals and the pre-draft vector
(:data:`~speckv.runtime.features.LOOKUP_FEATURE_NAMES`). The loss is the sum of the three
negative log-likelihoods (logged as ``nll_speculate_net``, ``nll_gamma_net`` and
``nll_lookup_net``, after the decision each network makes: whether to speculate, γ, and
whether to verify the lookup's continuation instead). Each network has its own parameters,
so adding one leaves the others' gradients as they were. The
policy value logged in validation runs both decisions on every row: "no speculation" is a
candidate with E[tokens] = 1 at the plain step's cost, taken when no γ's
``E_pre[γ] / cost(γ)`` beats it; otherwise the step network's γ, scored by the row's measured
outcome and costs (the catch-up the row's pre-draft vector assumes included). Where the
lookup proposes and its ``E / cost`` beats them all, the row is scored as a lookup step
instead (its accepted length + 1 tokens at its verify cost).

TensorBoard. Tags read ``<split>/<quantity>[/<compression>]`` (``val/skip_rate/int8``), but
for two headline groups named like PyTorch's TensorBoard examples (``Loss/train``):
TensorBoard's Time Series view opens the first two tag groups in sorted order and sorts
capitals first, so ``Loss`` (the total loss per step and per epoch, train and held-out) and
``Tokens per second`` (the policy on held-out prompts, overall and per compression) come
before Lightning's ``epoch`` and are what a new reader sees. HParams compares runs by the
held-out results in :data:`HPARAMS_METRICS` beside what a person tunes, keyed by its
command-line flag. Figures and histograms (calibration and the controller's choices per
compression) are logged at the step of the scalars beside them: one x-axis.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Final, Literal

import lightning as L
import numpy as np
import torch
import torchmetrics as tm
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from speckv.errors import SpeckvError
from speckv.runtime.features import (
    COMPRESSIONS,
    LOOKUP_FEATURE_NAMES,
    LOOKUP_MAX_TOKENS,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
)
from speckv.train.checkpoint import restore_rng_states, resume_mismatches, rng_states
from speckv.train.figures import calibration_figure, choices_figure
from speckv.train.network import (
    SurvivalMLP,
    lookup_expected,
    lookup_rule,
    option_layout,
    speculate_rule,
)

#: the headline tag groups (capitalised: TensorBoard sorts them before Lightning's "epoch")
LOSS: Final = "Loss"
TOKENS_PER_S: Final = "Tokens per second"
#: the held-out results HParams ranks runs by (it reads each one's latest value in the run)
HPARAMS_METRICS: Final = (
    f"{TOKENS_PER_S}/val",
    "val/gain_over_best_static",
    *(f"{TOKENS_PER_S}/val/{c}" for c in COMPRESSIONS),
    f"{LOSS}/val",
)

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
        trees: list[list[int]] | None = None,
        lookup_feature_names: list[str] | None = None,
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
            trees: the trees among the options, ``[size, depth, branch]`` each (linked from
                the data: speckv's trees where the records hold their outcomes, else none).
            lookup_feature_names: names of the lookup decision's features, in order (default:
                speckv's, which the DataModule builds).
        """
        super().__init__()
        # Lightning would log every argument, with a placeholder metric (hp_metric = -1);
        # on_fit_start logs what a person tunes, with the held-out results, instead
        self.save_hyperparameters(logger=False)
        self.gammas = list(gammas)
        self.trees = [list(t) for t in trees or ()]
        codes, upto, options = option_layout(self.gammas, self.trees)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("upto", upto, persistent=False)
        self.register_buffer("options", options, persistent=False)
        width = upto.shape[0]  # one survival curve per family: chains, then each tree
        self.pre_feature_names = list(pre_feature_names or PRE_FEATURE_NAMES)
        self.mlp = SurvivalMLP(n_features, width, list(hidden), dropout, activation)
        self.pre_mlp = SurvivalMLP(len(self.pre_feature_names), width, list(hidden),
                                   dropout, activation)
        # its initial weights come from a fork of the random state: the other networks, the
        # data order and dropout draw exactly what they drew before the lookup network existed
        self.lookup_feature_names = list(lookup_feature_names or LOOKUP_FEATURE_NAMES)
        with torch.random.fork_rng(devices=[]):
            self.lookup_mlp = SurvivalMLP(len(self.lookup_feature_names), LOOKUP_MAX_TOKENS,
                                          list(hidden), dropout, activation)
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
        self._calib: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        self._session_end = None  # HParams' end-of-run record, written by on_train_end

    # ----------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is not None and stage == "fit" and dm.mean is not None:
            self.mlp.set_scaling(torch.from_numpy(dm.mean), torch.from_numpy(dm.std))
            if getattr(dm, "pre_mean", None) is not None:
                self.pre_mlp.set_scaling(torch.from_numpy(dm.pre_mean),
                                         torch.from_numpy(dm.pre_std))
            if getattr(dm, "lookup_mean", None) is not None:
                self.lookup_mlp.set_scaling(torch.from_numpy(dm.lookup_mean),
                                            torch.from_numpy(dm.lookup_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.survival(x)

    def tuned_hparams(self) -> dict[str, bool | int | float | str]:
        """What a person tunes, keyed by the flag that sets it: the run's HParams columns.

        Values derived from the data (feature names, γs) and settings that do not change
        the result (DataLoader workers) are left out; a list reads as its items (``32-32``).
        """
        hp = self.hparams
        tuned: dict[str, bool | int | float | str] = {
            "model.hidden": "-".join(map(str, hp.hidden)),
            "model.activation": hp.activation,
            "model.dropout": hp.dropout,
            "model.lr": hp.lr,
            "model.weight_decay": hp.weight_decay,
            "model.objective": hp.objective,
        }
        if self._trainer is None:
            return tuned
        dm = self.trainer.datamodule
        if hasattr(dm, "tuned_hparams"):
            tuned |= dm.tuned_hparams()
        tuned["trainer.max_epochs"] = self.trainer.max_epochs
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's too)
        if seed is not None:
            tuned["seed_everything"] = int(seed)
        return tuned

    def on_fit_start(self) -> None:
        """Log the tuned hyperparameters, to TensorBoard's HParams with the held-out results.

        HParams reads each metric's latest value from the run's own scalars, so the
        experiment names :data:`HPARAMS_METRICS` without logging a value for them (Lightning's
        ``log_hyperparams`` would log its placeholder or a value at one step).
        """
        if not self.trainer.is_global_zero:
            return
        params = self.tuned_hparams()
        experiment, session_start, self._session_end = hparams_summaries(
            params, dict.fromkeys(HPARAMS_METRICS, 0.0))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.hparams.update(params)  # its hparams.yaml
                logger.experiment.file_writer.add_summary(experiment)
                logger.experiment.file_writer.add_summary(session_start)
            else:
                logger.log_hyperparams(params)

    def on_train_end(self) -> None:
        if self._session_end is None:
            return
        for writer in self._tensorboards():
            writer.file_writer.add_summary(self._session_end)  # HParams: the run finished

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        steps = self.trainer.estimated_stepping_batches if self._trainer else 1000
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
        # "name": the tag a LearningRateMonitor logs the rate under
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    # ----------------------------------------------------------------------------- steps
    def _unpack(self, batch):
        dm = self.trainer.datamodule
        return dm.batch_dict(batch) if isinstance(batch, (list, tuple)) else batch

    def _common_step(self, batch, stage: str) -> torch.Tensor:
        b = self._unpack(batch)
        z = self.mlp(b["x"])
        z_pre = self.pre_mlp(b["x_pre"])
        z_lookup = self.lookup_mlp(b["x_lookup"])
        nll_gamma = self._options_nll(z, b)
        nll_speculate = self._options_nll(z_pre, b)
        # rows where the lookup proposes nothing have cap 0: no observation
        nll_lookup = survival_nll(z_lookup, b["lookup_accept"], b["lookup_cap"])
        loss = nll_gamma + nll_speculate + nll_lookup
        # the total per training step as well (Lightning names the two Loss/train_step and
        # Loss/train_epoch); its parts, per epoch, by the decision each network makes
        self.log(f"{LOSS}/{stage}", loss, prog_bar=True, on_step=stage == "train",
                 on_epoch=True, batch_size=len(z))
        log = {"on_epoch": True, "on_step": False, "batch_size": len(z)}
        self.log(f"{stage}/nll_gamma_net", nll_gamma, **log)
        self.log(f"{stage}/nll_speculate_net", nll_speculate, **log)
        self.log(f"{stage}/nll_lookup_net", nll_lookup, **log)
        with torch.no_grad():
            self._update_metrics(z, z_pre, z_lookup, b, stage)
        return loss

    def _options_nll(self, z: torch.Tensor, b) -> torch.Tensor:
        """The chains' censored likelihood plus each tree's (the same observation model,
        on its own curve: its accepted length, capped by its depth and the tokens left)."""
        gmax = max(self.gammas)
        nll = survival_nll(z[:, :gmax], b["accept_len"], b["accept_cap"])
        start = gmax
        for t, (_, depth, _) in enumerate(self.trees):
            accept = b["tree_accept"][:, t].clamp_min(0)
            nll = nll + survival_nll(z[:, start : start + depth], accept, b["tree_cap"][:, t])
            start += depth
        return nll

    def _expected(self, z: torch.Tensor) -> torch.Tensor:
        """``E[tokens | option]`` for every option (chains, then trees)."""
        return 1.0 + torch.exp(F.logsigmoid(z) @ self.upto) @ self.options

    def _lookup_expected(self, z_lookup: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """``[batch, 1]`` E[tokens] of verifying the lookup's continuation of ``length``."""
        survival = torch.exp(torch.cumsum(F.logsigmoid(z_lookup), -1))
        k = torch.arange(1, z_lookup.shape[1] + 1, device=z_lookup.device)
        return lookup_expected(survival, k[None], length[:, None])

    def _update_metrics(self, z, z_pre, z_lookup, b, stage: str) -> None:
        gmax = max(self.gammas)
        surv = torch.exp(torch.cumsum(F.logsigmoid(z[:, :gmax]), -1))  # the chains' curve
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
            expected = self._expected(z[sel])
            pre_expected = self._expected(z_pre[sel])
            speculate = speculate_rule(pre_expected, costs, plain)
            length = b["lookup_cap"][sel]
            lookup_cost = b["lookup_cost"][sel][:, None]
            if per_step:
                lookup_cost = torch.ones_like(lookup_cost)
            lookup = (length > 0) & lookup_rule(self._lookup_expected(z_lookup[sel], length),
                                                lookup_cost, pre_expected, costs, plain)
            idx = (expected / costs).argmax(-1)
            gam = self.codes
            chains = torch.as_tensor(self.gammas, device=z.device)
            # columns: a plain step (1 token), then each γ (min(L, γ) + 1 tokens), then each
            # tree (its accepted length + 1)
            acc = torch.cat([torch.ones_like(plain),
                             torch.minimum(b["accept_len"][sel][:, None], chains[None, :]) + 1.0,
                             b["tree_accept"][sel][:, : len(self.trees)].clamp_min(0) + 1.0],
                            1)
            all_costs = torch.cat([plain, costs], 1)
            choice = torch.where(speculate, idx + 1, torch.zeros_like(idx))
            chosen_acc = torch.where(lookup, b["lookup_accept"][sel] + 1.0,
                                     acc.gather(1, choice[:, None])[:, 0])
            chosen_cost = torch.where(lookup, lookup_cost[:, 0],
                                      all_costs.gather(1, choice[:, None])[:, 0])
            self._policy.setdefault(stage, []).append(
                (chosen_acc, chosen_cost, acc, all_costs, b["compression"][sel], gam[idx],
                 speculate & ~lookup, lookup))
        if stage != "train":  # P(first draft token accepted), as each network predicts it
            self._calib.setdefault(stage, []).append(
                (surv[informative, 0], torch.sigmoid(z_pre[informative, 0]),
                 b["accept_len"][informative] >= 1, b["compression"][informative]))

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        b = self._unpack(batch)
        z = self.mlp(b["x"])
        expected = self._expected(z)
        costs, plain = b["costs"], b["plain_cost"][:, None]
        if self.hparams.objective == "tokens_per_step":
            costs, plain = torch.ones_like(costs), torch.ones_like(plain)
        pre_expected = self._expected(self.pre_mlp(b["x_pre"]))
        return {"survival": torch.exp(F.logsigmoid(z) @ self.upto), "expected_tokens": expected,
                "gamma": self.codes[(expected / costs).argmax(-1)],
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
            chosen_acc, chosen_cost, acc, costs, comp, gam, speculate, lookup = parts
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
            # evaluate's tokens_per_step; a tag ending in _step reads as Lightning's suffix
            self.log(f"{stage}/tokens_per_target_forward", chosen_acc.mean())
            self.log(f"{TOKENS_PER_S}/{stage}", tps_policy)
            self.log(f"{stage}/best_fixed_tokens_per_s", baselines["fixed"])
            self.log(f"{stage}/best_static_tokens_per_s", baselines["static"])
            self.log(f"{stage}/gain_over_best_fixed", tps_policy / baselines["fixed"])
            self.log(f"{stage}/gain_over_best_static", tps_policy / baselines["static"])
            self.log(f"{stage}/mean_gamma", gam[speculate].float().mean() if speculate.any()
                     else torch.zeros(()))
            # plain steps: neither the draft nor the lookup's continuation
            plain = ~(speculate | lookup)
            self.log(f"{stage}/skip_rate", plain.float().mean())
            self.log(f"{stage}/lookup_rate", lookup.float().mean())
            for i, c in enumerate(COMPRESSIONS):
                sel = comp == i
                if sel.any():
                    self.log(f"{TOKENS_PER_S}/{stage}/{c}",
                             chosen_acc[sel].sum() / chosen_cost[sel].sum())
                    self.log(f"{stage}/skip_rate/{c}", plain[sel].float().mean())
                    self.log(f"{stage}/lookup_rate/{c}", lookup[sel].float().mean())
            self._log_choices(stage, torch.where(speculate, gam, torch.zeros_like(gam)), comp)

    def on_train_epoch_end(self) -> None:
        self._end_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")
        self._log_calibration("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")
        self._log_calibration("test")

    # ------------------------------------------------------------- images and histograms
    def _tensorboards(self) -> list:
        """The SummaryWriters of the run's TensorBoard loggers (none in a sanity check)."""
        if self._trainer is None or self.trainer.sanity_checking:
            return []
        return [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]

    @property
    def _log_step(self) -> int:
        """The x of the scalars Lightning logs now (its count of batches that stepped: an
        epoch's validation is logged before the count takes in the epoch's last batch)."""
        return self.trainer.fit_loop.epoch_loop._batches_that_stepped

    def _log_choices(self, stage: str, choice: torch.Tensor, comp: torch.Tensor) -> None:
        """Where the controller's choices go, per compression: 0 is a plain step, else the
        γ drafted; a histogram each (its evolution over training) and one bar chart."""
        writers = self._tensorboards()
        if not writers:
            return
        choice, comp = choice.cpu().numpy(), comp.cpu().numpy()
        per_level = {c: choice[comp == i] for i, c in enumerate(COMPRESSIONS) if (comp == i).any()}
        gamma_max = int(self.codes.max())  # chains' γ, then the trees' codes
        edges = np.arange(gamma_max + 2) - 0.5  # one bucket per choice
        step = self._log_step
        for writer in writers:
            for c, chosen in per_level.items():
                writer.add_histogram(f"{stage}/choice/{c}", chosen, step, bins=edges)
            writer.add_figure(f"{stage}/choices", choices_figure(
                per_level, gamma_max, f"{stage} choices, epoch {self.current_epoch} "
                f"(step {step})"), step)

    def _log_calibration(self, stage: str) -> None:
        """Reliability of P(first draft token accepted): the step network (γ) and the
        pre-draft one (whether to speculate), one line per compression."""
        rows = self._calib.pop(stage, [])
        writers = self._tensorboards()
        if not rows or not writers:
            return
        gamma_net, speculate_net, hit, comp = (torch.cat(c).cpu().numpy()
                                               for c in zip(*rows, strict=True))
        panels = {network: {c: (predicted[comp == i], hit[comp == i])
                            for i, c in enumerate(COMPRESSIONS) if (comp == i).any()}
                  for network, predicted in (("γ network (after the first proposal)", gamma_net),
                                             ("speculate network (before drafting)",
                                              speculate_net))}
        step = self._log_step
        for writer in writers:
            writer.add_figure(f"{stage}/calibration", calibration_figure(
                panels, f"{stage} calibration, epoch {self.current_epoch} (step {step})"), step)

    # ------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        config = {"gamma_max": self.mlp.gamma_max, "hidden": list(self.hparams.hidden),
                  "dropout": self.hparams.dropout, "activation": self.hparams.activation}
        meta = {
            "mlp_config": {"n_features": self.hparams.n_features, **config},
            "pre_mlp_config": {"n_features": len(self.pre_feature_names), **config},
            "lookup_mlp_config": {**config, "n_features": len(self.lookup_feature_names),
                                  "gamma_max": self.lookup_mlp.gamma_max},
            "lookup_feature_names": list(self.lookup_feature_names),
            "feature_names": list(self.hparams.feature_names),
            "pre_feature_names": list(self.pre_feature_names),
            "max_skip_run": int(getattr(dm, "max_skip_run", MAX_SKIP_RUN)),
            "gammas": self.gammas,
            "trees": self.trees,
            "compressions": list(COMPRESSIONS),
            "objective": self.hparams.objective,
            "feature_set": getattr(dm, "feature_set", "decision"),
            "data_fingerprint": getattr(dm, "fingerprint", "unknown"),
        }
        if dm is not None and dm.parity_rows is not None:
            # tensors, not numpy arrays: Lightning reloads checkpoints with weights_only=True
            keys = ("parity_features", "parity_pre_features", "parity_costs",
                    "parity_plain_costs", "parity_lookup_features", "parity_lookup_costs")
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
