"""Method — GRPO: policy gradient with no critic, each reply judged against the other replies to its prompt.

    make grpo                                                  # = python -m stages.grpo
    python -m stages.grpo train.num_generations=8 train.beta=0.1 run=grpo-k8 parent_run=default
    python -m stages.grpo train.reward=gold                    # the gold oracle as the reward: the ceiling

TRL's GRPOTrainer on the PPO prompts: train.num_generations replies per prompt, advantages from the group's mean
(and spread, train.scale_rewards), the clipped ratio, and beta * KL to the SFT policy in the loss. The reward is
our reward model read exactly as PPO reads it (pipeline/trainers/group_rl.py: PPO's rollout rebuilt from TRL's
tokens, pipeline.rl.readout, normalised with the reward stage's statistics), or with `train.reward=gold` the gold
oracle. Every train.eval_every steps the policy answers held-out prompts (periodic.json: its curve on the gold-KL
plot); at the end the evaluation every method gets (pipeline.eval.gold.versus_sft). Interrupted? Run the same
command again: the Trainer resumes from its last checkpoint. `make rloo` runs this same story with RLOOTrainer.
"""

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.trainers.group_rl import run_group_rl


@entry("grpo")
def main(cfg: DictConfig) -> None:
    run_group_rl(cfg, "grpo")


if __name__ == "__main__":
    main()
