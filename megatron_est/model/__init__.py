"""GPT-2 and Llama language models built from tensor-parallel blocks, with EST slicing."""
