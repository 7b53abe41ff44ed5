"""The world-facts task: the project's built-in, download-free experiment.

- `corpus`: the pretraining corpus, generated from a seed and a table of 163 countries.
- `data`: the country split, SFT chats, preference pairs and RL prompts about the train countries, and the gold
  judge.
- `evaluation`: held-out QA graded by the gold judge, gold win-rates, and the defaults of experiments/evaluate.py.
- `end_to_end`: the driver of experiments/end_to_end.py (pretrain → SFT → reward model → RLHF → report).
"""
