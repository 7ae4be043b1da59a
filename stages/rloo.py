"""Method — RLOO: REINFORCE with a leave-one-out baseline, no critic (Ahmadian et al. 2024).

    make rloo                                                  # = python -m stages.rloo
    python -m stages.rloo train.num_generations=8 train.beta=0.1 run=rloo-k8 parent_run=default
    python -m stages.rloo train.reward=gold                    # the gold oracle as the reward: the ceiling

TRL's RLOOTrainer on the PPO prompts: train.num_generations replies per prompt, each reply's advantage its reward
less the mean of the others' (the reward already less beta * KL to the SFT policy), and the clipped ratio. The
reward is our reward model read exactly as PPO reads it (pipeline/trainers/group_rl.py: PPO's rollout rebuilt from
TRL's tokens, pipeline.rl.readout, normalised with the reward stage's statistics), or with `train.reward=gold` the
gold oracle. Every train.eval_every steps the policy answers held-out prompts (periodic.json); at the end the
evaluation every method gets (pipeline.eval.gold.versus_sft). Interrupted? Run the same command again: the Trainer
resumes from its last checkpoint.
"""

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.trainers.group_rl import run_group_rl  # GRPO's stage too: only TRL's trainer and the config differ


@entry("rloo")
def main(cfg: DictConfig) -> None:
    run_group_rl(cfg, "rloo")


if __name__ == "__main__":
    main()
