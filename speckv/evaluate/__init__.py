"""Evaluation by replay: every policy on held-out trace records with measured costs, the
baselines fitted on train, exact paired tests and bootstrap CIs, the report and figures."""
