"""RLOO (loop.algorithm=rloo): REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024,
arXiv:2402.14740). Its stages are GRPO's (`grpo.py`), which read the algorithm's name: the `rloo` config
section, the KL to π0 in the reward, each answer's advantage against the mean of the others' rewards, and the
clipped objective on whole answers (`policy_gradient.sequence_policy_loss`).
"""

from lite_rlhf.algorithms.grpo import iteration, start

__all__ = ["iteration", "start"]
