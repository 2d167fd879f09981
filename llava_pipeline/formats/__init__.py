"""The artifacts' and the task's formats, no model: tokenizer.bin and the HF tokenizer files, image
preprocessing, a .pte's bytes and declarations, the built-in task's scenes and questions."""
