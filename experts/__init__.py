"""Stage `experts`: K subject experts fine-tuned in parallel, their pseudo-targets, the buffer."""
