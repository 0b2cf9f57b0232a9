"""Downstream evaluation: offline lm-evaluation-harness tasks and an lm_eval LM around our model."""
