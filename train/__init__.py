"""The distillation harness: train a student from a teacher with CE + KD + the Kendall ranking loss.

``python -m train.distill --help`` lists the options; ``python -m train.demo`` runs the demo.
"""
