"""Pretrained checkpoints in and out: Hugging Face Llama / Qwen2 / Gemma <-> slm."""
