"""Training: the zoo's plain fine-tuning loop (lm.py) and `expertswitch train` (trainer.py):
dense / MoE / PR-MoE language models, Mixture-of-Students distillation, checkpoint and resume."""
