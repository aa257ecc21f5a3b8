"""Reinforcement learning pieces that need no Ray: GRPO math, rollout records, a toy task."""
