"""The commands that use every stage: post-training an export (finetune) and evaluating any model (eval)."""
