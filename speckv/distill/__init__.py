"""The demo draft's making: the target's answers to a disjoint prompt pool, distillation, and
agreement and cost on the held-out suites."""
