"""The captioner and generator wrappers, their families, LoRA, and what training draws and caches."""
